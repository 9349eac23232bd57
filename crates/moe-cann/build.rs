//! Links the Ascend toolkit when the `ascend` feature is on and `ASCEND_TOOLKIT_HOME` points at one.
//!
//! * Feature off (the default): links nothing, emits nothing but the cfg declaration.
//! * Feature on, `$ASCEND_TOOLKIT_HOME/lib64/libascendcl.so` present: adds `lib64` to the native
//!   search path, links `ascendcl` (runtime: devices, streams, memory) and, where present,
//!   `nnopbase` (aclTensor descriptors) and `opapi` (the aclnn operators) — the libraries ggml's
//!   CANN backend links — plus `opapi_transformer`, where newer CANN releases put the MoE
//!   operators (op-plugin's `op_api_common.h` looks in `libopapi_math/_nn/_cv/_transformer/
//!   _legacy.so`, then `libopapi.so`), and sets `--cfg moe_cann_toolkit`, which compiles
//!   `src/sys.rs`.
//! * Feature on, no toolkit: a `cargo:warning` that says what is missing; the crate stays the stub.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(moe_cann_toolkit)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=ASCEND_TOOLKIT_HOME");
    if env::var_os("CARGO_FEATURE_ASCEND").is_none() {
        return;
    }
    let home = match env::var_os("ASCEND_TOOLKIT_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => {
            println!(
                "cargo::warning=moe-cann: the `ascend` feature is on but ASCEND_TOOLKIT_HOME is not set; \
                 building the stub (no CANN library linked). Source the toolkit's set_env.sh \
                 (e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh) and rebuild."
            );
            return;
        }
    };
    let lib64 = home.join("lib64");
    let ascendcl = lib64.join("libascendcl.so");
    println!("cargo::rerun-if-changed={}", ascendcl.display());
    if !ascendcl.is_file() {
        println!(
            "cargo::warning=moe-cann: the `ascend` feature is on but {} does not exist \
             (ASCEND_TOOLKIT_HOME={}); building the stub (no CANN library linked).",
            ascendcl.display(),
            home.display()
        );
        return;
    }
    println!("cargo::rustc-link-search=native={}", lib64.display());
    println!("cargo::rustc-link-lib=dylib=ascendcl");
    for lib in ["nnopbase", "opapi", "opapi_transformer"] {
        if lib64.join(format!("lib{lib}.so")).is_file() {
            println!("cargo::rustc-link-lib=dylib={lib}");
        } else if lib == "opapi_transformer" {
            // Only in releases that split the operator library; 8.x has everything in opapi.
        } else {
            println!(
                "cargo::warning=moe-cann: {} has no lib{lib}.so; the symbols src/sys.rs declares from it will not link if used",
                lib64.display()
            );
        }
    }
    println!("cargo::rustc-cfg=moe_cann_toolkit");
}
