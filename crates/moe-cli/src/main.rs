//! `moe`: run the MoE layer of DeepSeek-class models on any accelerator.
//!
//! * `moe` / `moe demo` — a DeepSeek-V3-shaped layer on the best backend, checked against the CPU.
//! * `moe run` — one layer of a Hugging Face checkpoint on a safetensors input.
//! * `moe devices` — every backend, whether it is available here, and why not.
//! * `moe conform` — the conformance suite as a support matrix.
//! * `moe bench` — time against the roofline floor and against peers.

mod backends;
mod bench;
mod conform;
mod demo;
mod graphs;
mod in_file;
mod out_file;
mod plot;
mod run;
mod synthetic;
mod tensor_file;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// `--dtype`: a weight storage dtype (`u32` parses as a dtype but holds ids, not weights).
fn weight_dtype(s: &str) -> Result<moe_hal::DType, String> {
    match s.parse::<moe_hal::DType>() {
        Ok(d) if d.is_weight() => Ok(d),
        Ok(d) => Err(format!("{d} is not a weight dtype; expected f32, f16, bf16 or f8_e4m3")),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Parser)]
#[command(name = "moe", version, about = "Run the Mixture-of-Experts layer of DeepSeek-class models on any accelerator")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The main job (also what `moe` alone runs): a DeepSeek-V3-shaped layer scaled to fit, run on
    /// the best available backend and checked against the CPU reference.
    Demo(demo::DemoArgs),
    /// Run one MoE layer of a Hugging Face checkpoint on the hidden states in a safetensors file.
    Run(run::RunArgs),
    /// List every backend, whether it is available here, and why not.
    Devices,
    /// Run the conformance suite against one backend and write its support matrix.
    Conform(conform::ConformArgs),
    /// Time the layer against the device's roofline floor and against peers.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    // A reader that stops early (`moe devices | head -1`, `grep -q`) closes the pipe: end the
    // way Unix tools do, by SIGPIPE, not with a panic in `println!` reported as a bug (Rust
    // starts programs with SIGPIPE ignored).
    #[cfg(unix)]
    // SAFETY: sets one signal's disposition back to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A bug must still end in one sentence, not a backtrace. A panic a backend catches and
    // reports as an error (a driver's bindings panicking while it opens: moe_hal::catch_panic) is
    // no bug of moe's and prints nothing here.
    std::panic::set_hook(Box::new(|info| {
        if !moe_hal::panic_is_caught() {
            eprintln!("error: internal error (a bug in moe, please report it): {info}");
        }
    }));
    // Mesa's Vulkan drivers complain on stderr when XDG_RUNTIME_DIR is unset (as in CI and
    // containers) although compute needs no display; give them a harmless value.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // SAFETY: nothing else runs yet: no thread can read the environment concurrently.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Demo(demo::DemoArgs::default())) {
        Command::Demo(a) => demo::demo(&a),
        Command::Run(a) => run::run(&a),
        Command::Bench(a) => bench::bench(&a),
        Command::Conform(a) => conform::conform(&a),
        Command::Devices => {
            for (name, status) in backends::describe_all() {
                match status {
                    Ok(s) => println!("{name:5} available: {s}"),
                    Err(e) => println!("{name:5} not available: {e}"),
                }
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
