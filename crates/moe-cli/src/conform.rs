//! `moe conform`: the conformance suite against one backend, as a support matrix a person can read
//! (Markdown) and a program can compare (JSON), instead of a test log.

use crate::backends::{Choice, Job, dispatch};
use moe_conformance::{CaseInfo, Outcome, run_all};
use moe_hal::{Backend, Error, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct ConformArgs {
    /// The backend to test.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Choice,
    /// Write the matrix to FILE.md and FILE.json (any extension of FILE is replaced).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Run only the cases whose name contains this text.
    #[arg(long)]
    pub filter: Option<String>,
}

struct Conform<'a> {
    filter: Option<&'a str>,
}

impl Job for Conform<'_> {
    type Output = (String, Vec<(CaseInfo, Outcome)>);
    fn run<B: Backend>(self, b: &B) -> Result<Self::Output> {
        let results = run_all(b, |c| self.filter.is_none_or(|f| c.name.contains(f)));
        Ok((format!("{} ({})", b.info().name, b.info().device), results))
    }
}

fn cell(o: &Outcome) -> (&'static str, String) {
    match o {
        Outcome::Pass { rel_err } => ("pass", format!("{rel_err:.1e}")),
        Outcome::Fail(m) => ("fail", m.clone()),
        Outcome::Unsupported(m) => ("unsupported", m.clone()),
    }
}

/// The Markdown matrix: a summary per op x dtype, then every case.
pub fn markdown(device: &str, results: &[(CaseInfo, Outcome)]) -> String {
    let mut s = format!("# Conformance of {device}\n\n");
    let mut summary: BTreeMap<(String, &str), [usize; 3]> = BTreeMap::new();
    for (c, o) in results {
        let e = summary.entry((c.op.name().to_string(), c.dtype_name())).or_default();
        e[match o {
            Outcome::Pass { .. } => 0,
            Outcome::Fail(_) => 1,
            Outcome::Unsupported(_) => 2,
        }] += 1;
    }
    s += "| op | dtype | pass | fail | unsupported |\n|---|---|---|---|---|\n";
    for ((op, dt), [p, f, u]) in &summary {
        s += &format!("| {op} | {dt} | {p} | {f} | {u} |\n");
    }
    s += "\n| op | dtype | shape | case | result | relative error or reason |\n|---|---|---|---|---|---|\n";
    for (c, o) in results {
        let (r, detail) = cell(o);
        s += &format!("| {} | {} | {} | {} | {r} | {} |\n", c.op, c.dtype_name(), c.shape, c.name, detail.replace('|', "\\|"));
    }
    s
}

/// The JSON matrix: one object per case.
pub fn json(device: &str, results: &[(CaseInfo, Outcome)]) -> serde_json::Value {
    let cases: Vec<_> = results
        .iter()
        .map(|(c, o)| {
            let (r, detail) = cell(o);
            let mut v = serde_json::json!({"case": c.name, "op": c.op.name(), "dtype": c.dtype_name(), "shape": c.shape, "result": r});
            match o {
                Outcome::Pass { rel_err } => v["rel_err"] = serde_json::json!(rel_err),
                _ => v["reason"] = serde_json::json!(detail),
            }
            v
        })
        .collect();
    serde_json::json!({ "backend": device, "cases": cases })
}

pub fn conform(args: &ConformArgs) -> Result<()> {
    if let Some(base) = &args.report {
        // `--report out/` would otherwise write out.md and out.json beside the directory.
        if base.is_dir() || base.as_os_str().to_string_lossy().ends_with(std::path::MAIN_SEPARATOR) {
            return moe_hal::invalid!("--report {} is a directory; name a file base (FILE gives FILE.md and FILE.json)", base.display());
        }
        crate::out_file::check_writable(&base.with_extension("md"), "--report")?;
    }
    let (device, results) = dispatch(args.backend, Conform { filter: args.filter.as_deref() })?;
    if results.is_empty() {
        return moe_hal::invalid!("no conformance case matches the filter {:?}", args.filter.as_deref().unwrap_or(""));
    }
    let md = markdown(&device, &results);
    let (pass, fail) = (results.iter().filter(|r| r.1.is_pass()).count(), results.iter().filter(|r| r.1.is_fail()).count());
    for (c, o) in results.iter().filter(|r| !r.1.is_pass()) {
        println!("{}: {o}", c.name);
    }
    if let Some(base) = &args.report {
        let (md_path, json_path) = (base.with_extension("md"), base.with_extension("json"));
        crate::out_file::write_bytes(&md_path, md.as_bytes())?;
        let text = serde_json::to_string_pretty(&json(&device, &results)).map_err(|e| Error::Io(e.to_string()))?;
        crate::out_file::write_bytes(&json_path, text.as_bytes())?;
        println!("wrote {} and {}", md_path.display(), json_path.display());
    }
    println!("conformance of {device}: {pass} passed, {fail} failed, {} unsupported", results.len() - pass - fail);
    if fail > 0 {
        return Err(Error::Driver(format!("{fail} conformance case{} failed on {device}", if fail == 1 { "" } else { "s" })));
    }
    Ok(())
}
