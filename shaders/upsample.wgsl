// Resizing of NCHW planes as torch's interpolate, MODE 0 nearest, 1 bilinear. Source coordinates
// come from f32 scales as torch computes them: nearest reads (min(floor(o * s), n - 1)); bilinear
// reads around s * o (align_corners) or max(s * (o + 0.5) - 0.5, 0) (half-pixel), blending the two
// neighbours along x, then along y, in f32.

const WG: u32 = 256u;

struct UpsampleParams {
    planes: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    sh: f32,
    sw: f32,
    align_corners: u32,
}

@group(0) @binding(0) var<uniform> p: UpsampleParams;
@group(0) @binding(1) var<storage, read> x: array<T>;
@group(0) @binding(2) var<storage, read_write> y: array<T>;

// The lower source index, the upper one and the upper one's weight along one axis.
fn taps(o: u32, s: f32, n: u32) -> vec3<f32> {
    var real = s * f32(o);
    if (p.align_corners == 0u) {
        real = max(s * (f32(o) + 0.5) - 0.5, 0.0);
    }
    let i0 = min(u32(real), n - 1u);
    let i1 = select(i0, i0 + 1u, i0 < n - 1u);
    return vec3<f32>(f32(i0), f32(i1), real - f32(i0));
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    let plane = p.oh * p.ow;
    if (i >= p.planes * plane) { return; }
    let c = i / plane;
    let r = i % plane;
    let base = c * p.h * p.w;
    if (MODE == 0u) {
        let sy = min(u32(floor(f32(r / p.ow) * p.sh)), p.h - 1u);
        let sx = min(u32(floor(f32(r % p.ow) * p.sw)), p.w - 1u);
        y[i] = x[base + sy * p.w + sx];
        return;
    }
    let ty = taps(r / p.ow, p.sh, p.h);
    let tx = taps(r % p.ow, p.sw, p.w);
    let y0 = u32(ty.x) * p.w;
    let y1 = u32(ty.y) * p.w;
    let x0 = u32(tx.x);
    let x1 = u32(tx.y);
    let top = (1.0 - tx.z) * f32(x[base + y0 + x0]) + tx.z * f32(x[base + y0 + x1]);
    let bottom = (1.0 - tx.z) * f32(x[base + y1 + x0]) + tx.z * f32(x[base + y1 + x1]);
    y[i] = T((1.0 - ty.z) * top + ty.z * bottom);
}
