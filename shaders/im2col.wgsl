// Convolution columns and back, for convolution gradients. `im2col` lays out x [B, C, H, W] as
// cols [B, C*KH*KW, OH*OW]: row (c, ky, kx), column (oy, ox) holds the input pixel that kernel
// tap meets at that output (0 in the padding). `col2im` is its adjoint: each input pixel sums the
// columns that read it, found by solving oy*SY + ky*DY - PY = iy for every tap (no atomics, a
// fixed order, so results are deterministic).

const WG: u32 = 256u;

struct ColParams {
    b: u32, c: u32, h: u32, w: u32,
    kh: u32, kw: u32, oh: u32, ow: u32,
    sy: u32, sx: u32, py: u32, px: u32,
    dy: u32, dx: u32, n: u32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: ColParams;
@group(0) @binding(1) var<storage, read> src: array<T>;
@group(0) @binding(2) var<storage, read_write> dst: array<T>;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

@compute @workgroup_size(256)
fn im2col(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n) { return; }
    let cols = p.oh * p.ow;
    let rows = p.c * p.kh * p.kw;
    let col = i % cols;
    let row = (i / cols) % rows;
    let n = i / (cols * rows);
    let kx = row % p.kw;
    let ky = (row / p.kw) % p.kh;
    let c = row / (p.kw * p.kh);
    let iy = i32((col / p.ow) * p.sy + ky * p.dy) - i32(p.py);
    let ix = i32((col % p.ow) * p.sx + kx * p.dx) - i32(p.px);
    var v = T(0.0);
    if (iy >= 0 && ix >= 0 && iy < i32(p.h) && ix < i32(p.w)) {
        v = src[((n * p.c + c) * p.h + u32(iy)) * p.w + u32(ix)];
    }
    dst[i] = v;
}

@compute @workgroup_size(256)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.n) { return; }
    let ix = i % p.w;
    let iy = (i / p.w) % p.h;
    let c = (i / (p.w * p.h)) % p.c;
    let n = i / (p.w * p.h * p.c);
    let cols = p.oh * p.ow;
    let rows = p.c * p.kh * p.kw;
    var acc = 0.0;
    for (var ky = 0u; ky < p.kh; ky++) {
        let ty = i32(iy + p.py) - i32(ky * p.dy);
        if (ty < 0 || u32(ty) % p.sy != 0u) { continue; }
        let oy = u32(ty) / p.sy;
        if (oy >= p.oh) { continue; }
        for (var kx = 0u; kx < p.kw; kx++) {
            let tx = i32(ix + p.px) - i32(kx * p.dx);
            if (tx < 0 || u32(tx) % p.sx != 0u) { continue; }
            let ox = u32(tx) / p.sx;
            if (ox >= p.ow) { continue; }
            let row = (c * p.kh + ky) * p.kw + kx;
            acc += f32(src[(n * rows + row) * cols + oy * p.ow + ox]);
        }
    }
    dst[i] = T(acc);
}
