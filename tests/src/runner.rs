//! The data-driven side of the suite: cases as values, a runner that never panics, and the test
//! groups the [`crate::suite!`] macro turns into `#[test]` functions.

use crate::check::{CaseResult, Fail};
use moe_hal::{Backend, DType, Op, panic_message};
use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{OnceLock, RwLock};

/// What a case is, for reports and filters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CaseInfo {
    /// `group/case`, e.g. `grouped_gemm_bf16/gather_k7168`. Unique in the suite.
    pub name: String,
    /// The test group (and `#[test]` name) this case runs in, e.g. `grouped_gemm_bf16`.
    pub group: &'static str,
    /// The op under test.
    pub op: Op,
    /// The weight storage dtype, for ops that have weights (`grouped_gemm`, `forward`).
    pub dtype: Option<DType>,
    /// The shape in words, e.g. `T=5 E=256 k=8 H=64 I=16`.
    pub shape: String,
}

impl CaseInfo {
    /// The dtype column of a support matrix: the storage dtype, or `-` for ops without weights.
    pub fn dtype_name(&self) -> &'static str {
        self.dtype.map_or("-", DType::name)
    }
}

/// How a case went.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Matched the oracle; `rel_err` is the worst relative L2 error seen (0 for exact checks).
    Pass {
        /// The worst relative L2 error seen.
        rel_err: f64,
    },
    /// Wrong result, wrong error, contract violation or panic, in one sentence.
    Fail(String),
    /// [`Backend::supports`] said no: reported, not failed.
    Unsupported(String),
}

impl Outcome {
    /// True for [`Outcome::Pass`].
    pub fn is_pass(&self) -> bool {
        matches!(self, Outcome::Pass { .. })
    }

    /// True for [`Outcome::Fail`].
    pub fn is_fail(&self) -> bool {
        matches!(self, Outcome::Fail(_))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Pass { rel_err } => write!(f, "pass (rel err {rel_err:.2e})"),
            Outcome::Fail(m) => write!(f, "FAIL: {m}"),
            Outcome::Unsupported(m) => write!(f, "unsupported: {m}"),
        }
    }
}

/// The body of a case.
pub type CaseFn<B> = Box<dyn Fn(&B) -> CaseResult + Send + Sync>;

/// One case: what it is and how to run it on a backend.
pub struct Case<B: Backend> {
    /// What the case is.
    pub info: CaseInfo,
    /// Data-dependent bad input that a device may only report at the next blocking call: such a
    /// case runs alone, so its deferred error cannot surface in another case sharing the backend.
    pub exclusive: bool,
    /// The case itself.
    pub body: CaseFn<B>,
}

impl<B: Backend> Case<B> {
    /// A case of `group` named `group/name`.
    pub fn new(
        group: &'static str,
        name: &str,
        op: Op,
        dtype: Option<DType>,
        shape: impl Into<String>,
        body: impl Fn(&B) -> CaseResult + Send + Sync + 'static,
    ) -> Self {
        Case {
            info: CaseInfo { name: format!("{group}/{name}"), group, op, dtype, shape: shape.into() },
            exclusive: false,
            body: Box::new(body),
        }
    }

    /// Marks the case as one that must run alone (see [`Case::exclusive`]).
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }
}

/// Every test group, in the order the suite runs them. Each is one `#[test]` of [`crate::suite!`]
/// and names the op and the dtype it covers (`u32` for permute; `f32` for ops without weights, whose
/// inputs and outputs are f32).
pub const GROUPS: &[&str] = &[
    "router_topk_f32",
    "router_topk_f32_invalid",
    "permute_u32",
    "permute_u32_invalid",
    "grouped_gemm_f32",
    "grouped_gemm_f16",
    "grouped_gemm_bf16",
    "grouped_gemm_f8_e4m3",
    "grouped_gemm_f32_invalid",
    "grouped_gemm_swiglu_f32",
    "grouped_gemm_swiglu_f16",
    "grouped_gemm_swiglu_bf16",
    "grouped_gemm_swiglu_f8_e4m3",
    "grouped_gemm_swiglu_f32_invalid",
    "activation_f32",
    "activation_f32_invalid",
    "combine_f32",
    "combine_f32_invalid",
    "forward_f32",
    "forward_f16",
    "forward_bf16",
    "forward_f8_e4m3",
    "forward_f32_invalid",
];

/// Normal cases share the backend; exclusive ones take it alone.
static EXCLUSIVE: RwLock<()> = RwLock::new(());

/// Whether `backend` claims the case's op (for its dtype; for ops without weights, for any dtype).
fn supported<B: Backend>(backend: &B, info: &CaseInfo) -> Option<String> {
    let ok = match info.dtype {
        Some(d) => backend.supports(info.op, d),
        None => DType::FLOATS.iter().any(|&d| backend.supports(info.op, d)),
    };
    if ok {
        None
    } else {
        Some(format!("{} does not support {} for {}", backend.info().name, info.op, info.dtype.map_or("any dtype", DType::name)))
    }
}

/// Runs one case: checks [`Backend::supports`], then runs it, catching panics.
pub fn run_case<B: Backend>(backend: &B, case: &Case<B>) -> Outcome {
    if let Some(why) = supported(backend, &case.info) {
        return Outcome::Unsupported(why);
    }
    let _guard = if case.exclusive {
        (None, Some(EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner())))
    } else {
        (Some(EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner())), None)
    };
    match catch_unwind(AssertUnwindSafe(|| (case.body)(backend))) {
        Ok(Ok(rel_err)) => Outcome::Pass { rel_err },
        Ok(Err(Fail::Wrong(m))) => Outcome::Fail(m),
        Ok(Err(Fail::Unsupported(m))) => Outcome::Unsupported(m),
        Err(p) => Outcome::Fail(format!("panicked: {}", panic_message(&*p))),
    }
}

/// Every case of the suite for backend type `B`, in [`GROUPS`] order.
pub fn cases<B: Backend>() -> Vec<Case<B>> {
    crate::cases::all()
}

/// Runs every case whose info `filter` accepts; never panics.
pub fn run_all<B: Backend>(backend: &B, filter: impl Fn(&CaseInfo) -> bool) -> Vec<(CaseInfo, Outcome)> {
    cases::<B>()
        .into_iter()
        .filter(|c| filter(&c.info))
        .map(|c| {
            let o = run_case(backend, &c);
            (c.info, o)
        })
        .collect()
}

/// Runs one group (see [`GROUPS`]).
pub fn run_group<B: Backend>(backend: &B, group: &str) -> Vec<(CaseInfo, Outcome)> {
    run_all(backend, |i| i.group == group)
}

/// One line per case, for logs and the CLI.
pub fn report_line(info: &CaseInfo, outcome: &Outcome) -> String {
    format!("{:<48} {:<5} {:<40} {outcome}", info.name, info.dtype_name(), info.shape)
}

// ---------------------------------------------------------------------------------------------
// Support for the suite! macro
// ---------------------------------------------------------------------------------------------

/// The backend of one `suite!` instance, built once and shared by its tests (type-erased so the
/// macro need not name the backend's type).
pub type Slot = OnceLock<Result<Box<dyn Any + Send + Sync>, String>>;

/// Whether the comma-separated list in `MOE_REQUIRE_BACKENDS` names `backend`.
///
/// A suite instance named `<backend>_<variant>` (e.g. `cpu_f64`, `wgpu_split`) is a variant of
/// `<backend>` and is required whenever `<backend>` is.
pub fn backend_required(backend: &str) -> bool {
    std::env::var("MOE_REQUIRE_BACKENDS").is_ok_and(|v| {
        v.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .any(|n| backend == n || backend.strip_prefix(n).is_some_and(|rest| rest.starts_with('_')))
    })
}

/// The body of each `#[test]` the macro makes: build (once) or fetch the backend, run `group`,
/// print every case, and panic listing the failures. A backend that cannot be built is skipped
/// with a printed reason unless `MOE_REQUIRE_BACKENDS` names it.
#[doc(hidden)]
pub fn run_group_test<B: Backend>(slot: &'static Slot, backend_name: &str, ctor: fn() -> moe_hal::Result<B>, group: &str) {
    assert!(GROUPS.contains(&group), "unknown conformance group {group}");
    let built = slot.get_or_init(|| ctor().map(|b| Box::new(b) as Box<dyn Any + Send + Sync>).map_err(|e| e.to_string()));
    let backend = match built {
        Ok(b) => b.downcast_ref::<B>().expect("one suite! instance always builds the same backend type"),
        Err(why) if backend_required(backend_name) => {
            panic!("backend {backend_name} is required (MOE_REQUIRE_BACKENDS) but unavailable: {why}")
        }
        Err(why) => {
            // Straight to stderr, past the test harness's capture: a skipped backend shows as
            // "ok" in the test list, so the reason must show too.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "conformance: skipping {backend_name}::{group}: {why}");
            return;
        }
    };
    let results = run_group(backend, group);
    assert!(!results.is_empty(), "group {group} has no cases");
    // MOE_REQUIRE_SUPPORT=1 (CI): a required backend must run every case; one it reports
    // unsupported fails, so a `supports` that regressed to `false` cannot pass by running nothing.
    let strict = backend_required(backend_name) && std::env::var("MOE_REQUIRE_SUPPORT").is_ok_and(|v| v.trim() == "1");
    let mut failures = Vec::new();
    for (info, outcome) in &results {
        println!("[{backend_name}] {}", report_line(info, outcome));
        match outcome {
            Outcome::Fail(m) => failures.push(format!("  {} ({}): {m}", info.name, info.shape)),
            Outcome::Unsupported(m) if strict => {
                failures.push(format!("  {} ({}): unsupported, and MOE_REQUIRE_SUPPORT=1 requires every case: {m}", info.name, info.shape))
            }
            _ => {}
        }
    }
    if !failures.is_empty() {
        panic!("{} of {} cases of {group} failed on {backend_name}:\n{}", failures.len(), results.len(), failures.join("\n"));
    }
}

/// Checks that a `suite!` instance lists exactly [`GROUPS`] (`suite_forward!`: only groups of it), and that every
/// case belongs to one.
#[doc(hidden)]
pub fn check_groups<B: Backend>(listed: &[&str], every: bool) {
    if every {
        assert_eq!(listed, GROUPS, "the suite! macro and GROUPS disagree");
    } else {
        assert!(listed.iter().all(|g| GROUPS.contains(g)), "{listed:?} names a group GROUPS lacks");
    }
    let all = cases::<B>();
    let mut names = std::collections::HashSet::new();
    for c in &all {
        assert!(GROUPS.contains(&c.info.group), "case {} is in no group", c.info.name);
        assert!(names.insert(c.info.name.clone()), "case name {} is used twice", c.info.name);
    }
    for g in GROUPS {
        assert!(all.iter().any(|c| c.info.group == *g), "group {g} has no cases");
    }
}
