// Sinusoidal timestep embedding (diffusers' get_timestep_embedding): [sin(t f), cos(t f)]
// (or [cos, sin] with FLIP), zero-padded when dim is odd. The frequencies come from the host,
// computed exactly as diffusers does in f32, and t * f is one correctly rounded f32 product,
// so the only error left is in sin/cos: implemented here with Cody-Waite range reduction and
// minimax polynomials because WGSL's built-ins only promise 2^-11 absolute error near 0.

const WG: u32 = 256u;

struct TimestepParams {
    n: u32,
    dim: u32,
    half_dim: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: TimestepParams;
@group(0) @binding(1) var<storage, read> timesteps: array<f32>;
@group(0) @binding(2) var<storage, read> freqs: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<T>;

// sin and cos of x (|x| < ~1e5), as (sin, cos).
fn sincos_accurate(x: f32) -> vec2<f32> {
    // x = k * pi/2 + r, |r| <= pi/4, with pi/2 split so that k * C1 is exact.
    let k = round(x * 0.6366197723675814);
    let r = ((x - k * 1.5703125) - k * 4.837512969970703125e-4) - k * 7.549789948768648e-8;
    let r2 = r * r;
    let s = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4));
    let c = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5));
    let q = u32(i32(k) & 3);
    switch q {
        case 0u: { return vec2<f32>(s, c); }
        case 1u: { return vec2<f32>(c, -s); }
        case 2u: { return vec2<f32>(-s, -c); }
        default: { return vec2<f32>(-c, s); }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n * p.dim) { return; }
    let row = i / p.dim;
    let j = i % p.dim;
    if (j >= 2u * p.half_dim) { y[i] = T(0.0); return; }
    let f = j % p.half_dim;
    let sc = sincos_accurate(p.scale * (timesteps[row] * freqs[f]));
    // First half sin, second half cos; FLIP swaps them.
    let first = j < p.half_dim;
    y[i] = T(select(sc.y, sc.x, first != FLIP));
}
