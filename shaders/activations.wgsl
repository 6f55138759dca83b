// Activation functions shared by the elementwise kernels and fused GEMM epilogues.
// Computed in f32 whatever T is.

// erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7); WGSL has no erf.
fn erf_f32(x: f32) -> f32 {
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let r = 1.0 - poly * exp(-a * a);
    return select(r, -r, x < 0.0);
}

fn sigmoid_f32(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

// Activation codes: 0 none, 1 SiLU, 2 GELU (erf), 3 GELU (tanh), 4 quick GELU, 5 ReLU, 6 tanh.
fn activate(x: f32, act: u32) -> f32 {
    switch act {
        case 1u: { return x * sigmoid_f32(x); }
        case 2u: { return 0.5 * x * (1.0 + erf_f32(x * 0.7071067811865476)); }
        case 3u: {
            // Clamped so that implementations computing tanh through exp cannot overflow to NaN.
            let u = clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -15.0, 15.0);
            return 0.5 * x * (1.0 + tanh(u));
        }
        case 4u: { return x * sigmoid_f32(1.702 * x); }
        case 5u: { return max(x, 0.0); }
        // Clamped as above: tanh(15) is 1 in f32 already.
        case 6u: { return tanh(clamp(x, -15.0, 15.0)); }
        default: { return x; }
    }
}
