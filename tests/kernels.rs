//! Native kernel tests: the shared suite (`ldm_web::suite`) on the native adapter (lavapipe here),
//! then on the CPU backend. A missing adapter is a failure, not a skip. Filter with the first
//! argument or LDM_TEST_FILTER.

use std::process::ExitCode;

fn main() -> ExitCode {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-')).or_else(|| std::env::var("LDM_TEST_FILTER").ok()).unwrap_or_default();
    let log = |r: &ldm_web::suite::CaseResult| {
        let err = r.max_err.map_or(String::new(), |e| format!("  err={e:.2e} tol={:.0e}", r.tol.unwrap_or(0.0)));
        println!("{:<11} {} {}{err} {}", r.status, r.name, r.dtype, r.message);
    };
    let mut ok = true;
    for (label, cpu) in [("native", false), ("cpu backend", true)] {
        match pollster::block_on(ldm_web::suite::run_on(&filter, cpu, &log)) {
            Ok(rep) => {
                let a = &rep.adapter;
                println!("adapter: {} ({}, {}, shader-f16 {}, profile {:?})", a.name, a.backend, a.driver, a.shader_f16, a.profile);
                println!("{label} ({}): {} passed, {} failed, {} unsupported", a.name, rep.passed, rep.failed, rep.unsupported);
                ok &= rep.failed == 0 && rep.passed > 0;
            }
            Err(e) => {
                println!("{label} kernel tests could not run: {e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
