//! CUDA graphs: the backend's work (a whole layer's `forward`, say) captured once and replayed
//! with one launch ([`CudaBackend::capture`], [`CudaGraph`]).
//!
//! Why: at decode a layer is about a dozen small kernel launches and as many stream-ordered
//! allocations, and enqueuing them costs the host microseconds each, while the kernels of a
//! small layer finish in tens of microseconds (Qwen3-30B-A3B's eight touched experts are 75 MB:
//! 18 µs of an H200's bandwidth). A graph launch enqueues the whole layer in one call. Inference
//! engines capture one graph per batch size and replay it every step.
//!
//! A capture holds kernel launches, device copies and zeroing. It refuses, with an error that
//! names the call: a synchronize or a download (a graph cannot wait for itself), an upload from
//! host memory (the graph would not see later host data), a capture inside a capture.
//!
//! Memory: a buffer allocated inside the capture is a plain allocation (`cuMemAlloc`, allowed
//! there because the capture is in CUDA's relaxed mode, as PyTorch's allocator does it), not a
//! graph allocation node. One dropped inside the capture (the layer's scratch) belongs to the
//! graph and is freed with it; one kept is the caller's, like any other buffer. So the scratch
//! costs no allocation per launch, and stays allocated while the graph lives.
//!
//! The graph keeps the addresses of the buffers it was captured with: each launch reads and
//! writes those same buffers, so new input goes into the same input buffer
//! ([`moe_hal::Backend::copy`], or the engine's own kernels) before the launch. Those buffers stay
//! allocated while the graph lives, even when their [`crate::CudaBuffer`] is dropped (their free
//! waits for the graph's drop), so a launch never touches freed memory.
//!
//! The device has one stream, and everything enqueued on it during a capture goes into the
//! graph, whichever thread enqueues it: so while one thread captures, every other thread's work
//! on the backend (an op, a copy, a synchronize, a capture) waits for the capture to end
//! ([`Device::enqueue`]); frees do not wait (they are put off until it ends). The other way
//! round, a capture begins only once every call that is enqueuing has enqueued, so no call that
//! found no capture can put its work into one ([`Gate`]).
//!
//! Memory the pool keeps is handed back to the driver as a capture begins (its allocations are
//! plain `cuMemAlloc`, which cannot draw on the pool), and a graph keeps every buffer it uses
//! allocated while it lives: an engine that drops a layer's weights to load the next one frees
//! their memory only once it drops that layer's graphs too.
//!
//! On the CPU emulator a capture records the same work (each launch's arguments, the copies, the
//! zeroing, the allocations) without running it, and a launch replays the record. The graph's
//! own allocations are filled with `0xFF` bytes (f32 NaN) at each replay, at the point where
//! they are allocated, since CUDA gives them no defined contents: a kernel that read scratch
//! before writing it would show.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fmt::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;

use cudarc::driver::result as dr;
use cudarc::driver::sys;
use moe_hal::{Error, Layer, Result, Tensor};

use crate::CudaBackend;
use crate::driver::Device;
use crate::kernels::Source;

/// One step of a capture recorded on the emulator.
pub(crate) enum Step {
    /// A kernel launch with its arguments as [`Device::launch`] took them.
    Launch { entry: CString, grid: u32, block: u32, smem: u32, params: [u32; 16], ptrs: Vec<u64> },
    /// `bytes` zeroed at `ptr`.
    Zero { ptr: u64, bytes: usize },
    /// A device copy.
    Copy { dst: u64, src: u64, bytes: usize },
    /// An allocation of the graph's scratch: its bytes become `0xFF` (undefined contents, made
    /// visible).
    Allocate { ptr: u64, bytes: usize },
}

/// The state of a capture in progress on a device.
pub(crate) struct Capture {
    /// The thread capturing: the device's stream is its own until the capture ends, and other
    /// threads' work on the backend waits ([`Device::gate`]).
    pub owner: ThreadId,
    /// What the emulator recorded (empty on a GPU, where the driver records).
    pub steps: Vec<Step>,
    /// Every device address the captured work reads or writes.
    pub used: HashSet<u64>,
    /// Kernel launches, copies and zeroings captured.
    pub enqueued: usize,
    /// The allocations made inside the capture, and whether each is still alive (not dropped:
    /// the caller's; dropped: the graph's scratch).
    pub allocs: HashMap<u64, bool>,
    /// Buffers allocated before the capture and dropped during it: freed when it ends (or kept
    /// for the graph, when it uses them).
    pub deferred: Vec<u64>,
    /// Graphs dropped during the capture, taken apart when it ends.
    pub orphans: Vec<Parts>,
}

/// Which buffers live graphs use: a buffer dropped while a graph uses it is parked, and freed
/// when the last such graph is dropped.
#[derive(Default)]
pub(crate) struct GraphRefs {
    count: HashMap<u64, usize>,
    parked: HashSet<u64>,
}

/// What [`Device::free_raw`] should do with an address.
pub(crate) enum Free {
    /// Free it now.
    Now,
    /// Allocated inside the capture in progress: it is the graph's now, freed with the graph.
    InGraph,
    /// Wait: a capture is in progress (freed when it ends), or a live graph uses it (freed with
    /// the graph).
    Later,
}

impl Capture {
    fn new() -> Capture {
        Capture {
            owner: std::thread::current().id(),
            steps: vec![],
            used: HashSet::new(),
            enqueued: 0,
            allocs: HashMap::new(),
            deferred: vec![],
            orphans: vec![],
        }
    }
}

/// Who is using the device's one stream: the capture in progress, and how many calls are
/// enqueuing on it ([`Enqueue`]).
#[derive(Default)]
pub(crate) struct Gate {
    pub capture: Option<Capture>,
    /// Live [`Enqueue`] guards. A capture begins only when there are none: a call that looked,
    /// saw no capture and then enqueued would otherwise put its work into a capture that began
    /// in between (its launch recorded, not run; its free or synchronize breaking the capture).
    enqueuing: usize,
}

/// A call's hold on the stream: while any is alive no capture begins (see [`Gate::enqueuing`]).
/// Held from the check of the device's state to the driver call that enqueues, not longer;
/// calls nest (an allocation's retry synchronizes).
#[must_use = "the hold lasts as long as the guard: bind it to a name, not `_`"]
pub(crate) struct Enqueue<'a>(&'a Device);

impl Drop for Enqueue<'_> {
    fn drop(&mut self) {
        let mut g = self.0.gate.lock().unwrap_or_else(|p| p.into_inner());
        g.enqueuing -= 1;
        if g.enqueuing == 0 {
            self.0.gate_changed.notify_all();
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: how long this thread pauses between passing the gate and enqueuing, to widen the
    /// window in which a capture beginning on another thread could take its work.
    pub(crate) static PAUSE_AFTER_GATE: std::cell::Cell<std::time::Duration> = const { std::cell::Cell::new(std::time::Duration::ZERO) };
}

#[cfg(test)]
fn pause_after_gate() {
    let d = PAUSE_AFTER_GATE.with(|p| p.get());
    if !d.is_zero() {
        std::thread::sleep(d);
    }
}

impl Device {
    /// Waits while another thread is capturing (everything enqueued on the device's one stream
    /// during a capture would become part of that graph, so another thread's work, whether an
    /// op, a copy, a synchronize or a capture, waits for it to end; the capturing thread passes),
    /// then holds off new captures until the guard drops.
    pub(crate) fn enqueue(&self) -> Enqueue<'_> {
        let mut g = self.gate_locked();
        g.enqueuing += 1;
        drop(g);
        #[cfg(test)]
        pause_after_gate();
        Enqueue(self)
    }

    /// Holds off new captures without waiting for one in progress: for frees, which never wait
    /// for a capture (they are put off until it ends, [`Device::free_plan`]).
    pub(crate) fn hold(&self) -> Enqueue<'_> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).enqueuing += 1;
        Enqueue(self)
    }

    /// The gate, locked once no other thread is capturing: no capture, or this thread's.
    fn gate_locked(&self) -> MutexGuard<'_, Gate> {
        let me = std::thread::current().id();
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        while g.capture.as_ref().is_some_and(|c| c.owner != me) {
            g = self.gate_changed.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g
    }

    /// Begins a capture on this thread: waits for another thread's capture to end and for every
    /// call enqueuing to finish, then marks the capture and starts the driver's, with the gate
    /// locked throughout, so no other call slips in between.
    fn begin_capture(&self) -> Result<()> {
        let me = std::thread::current().id();
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match &g.capture {
                Some(c) if c.owner == me => return Err(Device::not_in_capture("another capture")),
                None if g.enqueuing == 0 => break,
                _ => g = self.gate_changed.wait(g).unwrap_or_else(|p| p.into_inner()),
            }
        }
        if self.emu.is_none() {
            // Relaxed: this thread may call cuMemAlloc while capturing (see the module docs), and
            // other threads go on with their own CUDA work; what a graph cannot hold is refused
            // by the backend itself, with a sentence.
            // SAFETY: the stream is the device's; nothing else is enqueuing on it (the gate).
            let r = unsafe { dr::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) };
            r.map_err(|e| self.fail("cuStreamBeginCapture", e))?;
        }
        g.capture = Some(Capture::new());
        Ok(())
    }

    /// Runs `f` on the capture in progress: `None` when there is none. Whichever thread calls,
    /// as the stream would take its work into the graph: [`Device::enqueue`] keeps other threads
    /// out before they get here.
    pub(crate) fn with_capture<R>(&self, f: impl FnOnce(&mut Capture) -> R) -> Option<R> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner()).capture.as_mut().map(f)
    }

    /// Whether a capture is in progress on this device.
    pub(crate) fn capturing(&self) -> bool {
        self.with_capture(|_| ()).is_some()
    }

    /// Notes one launch, copy or zeroing that uses `ptrs`: `Some(())` when a capture is in
    /// progress. The emulator then records `step` instead of running the work; a GPU runs it,
    /// and its driver records it.
    pub(crate) fn note(&self, ptrs: &[u64], step: impl FnOnce() -> Option<Step>) -> Option<()> {
        let emulated = self.emu.is_some();
        self.with_capture(|c| {
            c.used.extend(ptrs.iter().copied());
            c.enqueued += 1;
            if let Some(s) = step().filter(|_| emulated) {
                c.steps.push(s);
            }
        })
    }

    /// Notes a new allocation, inside a capture (then it is the graph's own).
    pub(crate) fn note_alloc(&self, ptr: u64, bytes: usize) {
        let emulated = self.emu.is_some();
        self.with_capture(|c| {
            c.allocs.insert(ptr, true);
            if emulated {
                c.steps.push(Step::Allocate { ptr, bytes });
            }
        });
    }

    /// Decides what freeing `ptr` means now (see [`Free`]). A free never waits: during any
    /// thread's capture it is put off until the capture ends.
    pub(crate) fn free_plan(&self, ptr: u64) -> Free {
        let in_capture = self.with_capture(|c| match c.allocs.get_mut(&ptr) {
            Some(alive) => {
                *alive = false;
                Free::InGraph
            }
            None => {
                c.deferred.push(ptr);
                Free::Later
            }
        });
        if let Some(plan) = in_capture {
            return plan;
        }
        let mut refs = self.graph_refs.lock().unwrap_or_else(|p| p.into_inner());
        if refs.count.contains_key(&ptr) {
            refs.parked.insert(ptr);
            return Free::Later;
        }
        Free::Now
    }

    /// The error of a call that cannot be captured.
    pub(crate) fn not_in_capture(what: &str) -> Error {
        Error::InvalidArgument(format!(
            "{what} inside CudaBackend::capture: a CUDA graph cannot hold it (a graph cannot wait for itself, \
             read the device back, or see later host data); do it before the capture or after CudaGraph::launch"
        ))
    }
}

/// A captured sequence of the backend's work, launched as a whole by [`CudaGraph::launch`]. Made
/// by [`CudaBackend::capture`]; see the module docs of `graph.rs` for what a capture may hold.
pub struct CudaGraph {
    dev: Arc<Device>,
    /// The executable graph (null on the emulator).
    exec: sys::CUgraphExec,
    /// The emulator's record (empty on a GPU).
    steps: Vec<Step>,
    /// The scratch allocated and dropped inside the capture, freed with the graph.
    owned: Vec<u64>,
    /// The buffers from outside the capture that the graph uses (kept allocated while it lives).
    uses: Vec<u64>,
    /// Kernel launches, copies and zeroings captured.
    nodes: usize,
}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGraph")
            .field("nodes", &self.nodes)
            .field("scratch_buffers", &self.owned.len())
            .field("buffers_used", &self.uses.len())
            .field("emulated", &self.exec.is_null())
            .finish()
    }
}

// SAFETY: the executable graph is a driver handle, usable from any thread once the context is
// current there ([`Device::ready`] makes it so before every call); the record is plain data.
unsafe impl Send for CudaGraph {}
unsafe impl Sync for CudaGraph {}

impl CudaBackend {
    /// Captures the work `work` enqueues on this backend (a whole [`moe_hal::Backend::forward`],
    /// say) as one CUDA graph, without running it: [`CudaGraph::launch`] then runs all of it with
    /// one call, on the buffers it was captured with.
    ///
    /// Run the same work once before capturing it (the benchmarks' warm-up does): every kernel
    /// is compiled and loaded here first, and the first run shows any error outside the graph.
    /// Errors: [`Error::InvalidArgument`] naming the call when the work synchronizes, downloads,
    /// uploads from host memory or captures; the work's own error as it returned it; a driver
    /// error when the driver refuses the graph. The backend stays usable after any of them.
    ///
    /// ```no_run
    /// use moe_hal::{DType, HostLayer, Layer, Tensor, ops};
    ///
    /// /// One token at a time through a layer: captured once, replayed for every batch.
    /// fn decode(host: &HostLayer, next_batches: Vec<Vec<f32>>) -> moe_hal::Result<()> {
    ///     let b = moe_cuda::CudaBackend::new()?;
    ///     let layer = Layer::upload(&b, host)?;
    ///     let (t, h, k) = (1, host.config.hidden, host.config.top_k);
    ///     let mut x = Tensor::alloc(&b, DType::F32, &[t, h])?;
    ///     let mut out = Tensor::alloc(&b, DType::F32, &[t, h])?;
    ///     let mut ids = Tensor::alloc(&b, DType::U32, &[t, k])?;
    ///     let mut w = Tensor::alloc(&b, DType::F32, &[t, k])?;
    ///     ops::forward(&b, &layer, &x, &mut out, &mut ids, &mut w)?; // loads every kernel it needs
    ///     let graph = b.capture(|| ops::forward(&b, &layer, &x, &mut out, &mut ids, &mut w))?;
    ///     for batch in next_batches {
    ///         let staged = Tensor::from_f32(&b, DType::F32, &[t, h], &batch)?;
    ///         moe_hal::Backend::copy(&b, &staged.buf, &mut x.buf)?; // the graph reads x
    ///         graph.launch()?;
    ///         let y = out.to_f32(&b)?; // waits for the launch
    /// #       let _ = y;
    ///     }
    ///     Ok(())
    /// }
    /// ```
    pub fn capture(&self, work: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        let dev = &self.dev;
        {
            let _slot = dev.ready()?;
            if dev.capturing() {
                return Err(Device::not_in_capture("another capture"));
            }
        }
        if dev.emu.is_none() {
            // Every kernel loaded before the capture: a module load, or a lazily loaded kernel's
            // first use, inside it could end it. (An entry this GPU's module lacks is one the
            // backend never launches on it: its error would come from the launch.)
            for s in Source::ALL {
                dev.module(s)?;
                for e in s.entries() {
                    let _ = dev.func(s, e);
                }
            }
        }
        // The capture allocates with cuMemAlloc (see the module docs), which cannot use the
        // memory the pool keeps (Device::new keeps freed memory there): hand that back first, or a
        // capture after its warm-up could run out of memory with the warm-up's scratch idle.
        dev.trim_pool()?;
        dev.begin_capture()?;
        // The capture ends even when `work` panics: the stream must not stay capturing.
        let mut ending = Ending { dev, done: false };
        let result = work();
        let (graph, cap) = ending.end();
        self.finish(result, graph, cap)
    }

    /// Instantiates the captured graph, or cleans up after a capture that failed.
    fn finish(
        &self,
        result: Result<()>,
        graph: Option<std::result::Result<sys::CUgraph, dr::DriverError>>,
        mut cap: Capture,
    ) -> Result<CudaGraph> {
        let dev = &self.dev;
        // Graphs dropped during the capture: taken apart on the way out, after the new graph
        // (if any) counts the buffers it uses, so none of those is freed under it.
        let _orphans = Orphans(dev, std::mem::take(&mut cap.orphans));
        // The graph's scratch: allocated and dropped inside the capture.
        let owned: Vec<u64> = cap.allocs.iter().filter(|(_, alive)| !**alive).map(|(p, _)| *p).collect();
        // Every other buffer it uses (the caller's, kept allocated while the graph lives).
        let uses: Vec<u64> = cap.used.iter().copied().filter(|p| !owned.contains(p)).collect();
        let template = match graph {
            Some(Ok(g)) => Some(g),
            Some(Err(e)) if result.is_ok() => {
                self.release(&owned, &cap.deferred);
                return Err(Error::Driver(format!(
                    "cuStreamEndCapture: {:?}: the captured work did something a CUDA graph cannot hold",
                    e.0
                )));
            }
            _ => None,
        };
        if let Err(e) = result {
            if let Some(g) = template {
                // SAFETY: the graph came from cuStreamEndCapture and is destroyed once.
                let _ = unsafe { dr::graph::destroy(g) };
            }
            self.release(&owned, &cap.deferred);
            return Err(e);
        }
        let exec = match template {
            Some(g) => {
                // SAFETY: the graph came from cuStreamEndCapture; the executable copy stands alone,
                // so the template is destroyed right away.
                let exec = unsafe { dr::graph::instantiate(g, sys::CUgraphInstantiate_flags(0)) };
                let _ = unsafe { dr::graph::destroy(g) };
                let exec = match exec {
                    Ok(x) => x,
                    Err(e) => {
                        self.release(&owned, &cap.deferred);
                        return Err(dev.fail("cuGraphInstantiateWithFlags", e));
                    }
                };
                // Uploads the graph's work to the device now, so the first launch costs what the
                // others do. A failure here only moves that work to the first launch.
                // SAFETY: `exec` and the stream are valid.
                let _ = unsafe { dr::graph::upload(exec, dev.stream) };
                exec
            }
            None => std::ptr::null_mut(),
        };
        {
            let mut refs = dev.graph_refs.lock().unwrap_or_else(|p| p.into_inner());
            for p in &uses {
                *refs.count.entry(*p).or_insert(0) += 1;
            }
        }
        // Buffers dropped during the capture: freed now, or parked when the graph uses them.
        for p in &cap.deferred {
            dev.free_raw(*p);
        }
        // The emulator poisons only the graph's scratch: a buffer kept by the caller is the
        // caller's to fill, as on a GPU.
        let mut steps = cap.steps;
        steps.retain(|s| !matches!(s, Step::Allocate { ptr, .. } if !owned.contains(ptr)));
        Ok(CudaGraph { dev: dev.clone(), exec, steps, owned, uses, nodes: cap.enqueued })
    }

    /// After a failed capture: the scratch it allocated, and the buffers whose frees waited for
    /// the capture.
    fn release(&self, owned: &[u64], deferred: &[u64]) {
        for p in owned {
            self.dev.free_owned(*p);
        }
        for p in deferred {
            self.dev.free_raw(*p);
        }
    }
}

/// Ends the capture in progress on `dev` once: in [`Ending::end`], or when dropped (a panic in
/// the captured work).
struct Ending<'a> {
    dev: &'a Device,
    done: bool,
}

impl Ending<'_> {
    /// Ends the capture: the driver's graph (`None` on the emulator) and what was noted.
    fn end(&mut self) -> (Option<std::result::Result<sys::CUgraph, dr::DriverError>>, Capture) {
        self.done = true;
        let graph = if self.dev.emu.is_none() {
            // SAFETY: the stream is capturing (begun by CudaBackend::capture).
            Some(unsafe { dr::stream::end_capture(self.dev.stream) })
        } else {
            None
        };
        let cap = self.dev.gate.lock().unwrap_or_else(|p| p.into_inner()).capture.take().unwrap_or_else(Capture::new);
        self.dev.gate_changed.notify_all();
        (graph, cap)
    }
}

/// Graphs dropped during a capture, taken apart when this is dropped.
struct Orphans<'a>(&'a Device, Vec<Parts>);

impl Drop for Orphans<'_> {
    fn drop(&mut self) {
        for parts in self.1.drain(..) {
            self.0.take_apart(parts);
        }
    }
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if !self.done {
            let (graph, mut cap) = self.end();
            let _orphans = Orphans(self.dev, std::mem::take(&mut cap.orphans));
            if let Some(Ok(g)) = graph {
                // SAFETY: the graph came from cuStreamEndCapture and is destroyed once.
                let _ = unsafe { dr::graph::destroy(g) };
            }
            for (p, _) in cap.allocs.iter().filter(|(_, alive)| !**alive) {
                self.dev.free_owned(*p);
            }
            for p in cap.deferred {
                self.dev.free_raw(p);
            }
        }
    }
}

impl CudaGraph {
    /// Enqueues the whole captured work on the backend's stream (one `cuGraphLaunch`; on the
    /// emulator, the record replayed). Like every op it does not wait: `synchronize` or a
    /// download reports its errors, the kernels' error flags included.
    pub fn launch(&self) -> Result<()> {
        let dev = &self.dev;
        let _slot = dev.ready()?;
        if dev.capturing() {
            return Err(Device::not_in_capture("CudaGraph::launch"));
        }
        if dev.emu.is_none() {
            // SAFETY: `exec` is a live executable graph of this context; the stream is the device's.
            let r = unsafe { dr::graph::launch(self.exec, dev.stream) };
            return dev.check("cuGraphLaunch", r);
        }
        for step in &self.steps {
            match step {
                Step::Launch { entry, grid, block, smem, params, ptrs } => dev.emu_launch(entry, *grid, *block, *smem, params, ptrs)?,
                // SAFETY: emulator allocations of at least `bytes` bytes (noted when enqueued).
                Step::Zero { ptr, bytes } => unsafe { std::ptr::write_bytes(*ptr as *mut u8, 0, *bytes) },
                // SAFETY: as above, for both.
                Step::Copy { dst, src, bytes } => unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes) },
                // SAFETY: the graph's own allocation of `bytes` bytes.
                Step::Allocate { ptr, bytes } => unsafe { std::ptr::write_bytes(*ptr as *mut u8, 0xFF, *bytes) },
            }
        }
        Ok(())
    }

    /// The kernel launches, device copies and zeroings the graph holds (its allocations and
    /// frees not counted).
    pub fn nodes(&self) -> usize {
        self.nodes
    }
}

/// Dropping a graph waits for its launches to finish (its scratch is freed then), so it is not
/// a thing to do in a decode loop. Dropped while another capture is in progress (which cannot
/// wait), it is taken apart when that capture ends.
impl Drop for CudaGraph {
    fn drop(&mut self) {
        let parts = Parts { exec: self.exec, owned: std::mem::take(&mut self.owned), uses: std::mem::take(&mut self.uses) };
        let mut parts = Some(parts);
        if self.dev.with_capture(|c| c.orphans.extend(parts.take())).is_none()
            && let Some(p) = parts
        {
            self.dev.take_apart(p);
        }
    }
}

/// What a dropped graph leaves to free.
pub(crate) struct Parts {
    exec: sys::CUgraphExec,
    owned: Vec<u64>,
    uses: Vec<u64>,
}

impl Device {
    /// Frees a dropped graph: waits for its launches, destroys it, frees its scratch, and frees
    /// the buffers it kept once no live graph uses them.
    fn take_apart(&self, parts: Parts) {
        if !parts.exec.is_null()
            && let Ok(_slot) = self.ready()
        {
            // SAFETY: the stream is the device's (not capturing: see CudaGraph's Drop); `exec`
            // came from instantiate and is destroyed once, after its launches finished.
            unsafe {
                let _ = dr::stream::synchronize(self.stream);
                let _ = dr::graph::exec_destroy(parts.exec);
            }
        }
        for p in &parts.owned {
            self.free_owned(*p);
        }
        let mut free = Vec::new();
        {
            let mut refs = self.graph_refs.lock().unwrap_or_else(|p| p.into_inner());
            for p in &parts.uses {
                if let Some(n) = refs.count.get_mut(p) {
                    *n -= 1;
                    if *n == 0 {
                        refs.count.remove(p);
                        if refs.parked.remove(p) {
                            free.push(*p);
                        }
                    }
                }
            }
        }
        for p in free {
            self.free_raw(p);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Graph mode: `forward` as replays
// ---------------------------------------------------------------------------------------------

/// The graphs `forward` keeps in graph mode ([`CudaBackend::with_forward_graphs`]), the most
/// recently used first, each under the key of the call it was captured for ([`forward_key`]).
pub(crate) type ForwardGraphs = Mutex<Vec<(String, CudaGraph)>>;

/// Graphs graph mode keeps: a decode loop needs one per batch size it runs. A call unlike all
/// of them is captured anew, and the least recently used graph dropped (which waits for the
/// device).
pub(crate) const FORWARD_GRAPHS: usize = 16;

/// What a captured `forward` depends on besides the contents of its buffers: the layer's
/// config and dtype (kernel parameters are baked into the graph), and the address, dtype and
/// shape of every tensor it reads or writes. A graph keeps the buffers it uses allocated, so an
/// address in a live graph's key always means the same buffer.
fn forward_key(layer: &Layer<CudaBackend>, tensors: [&Tensor<CudaBackend>; 4]) -> String {
    fn add(key: &mut String, t: &Tensor<CudaBackend>) {
        let _ = write!(key, "{:x} {} {:?};", t.buf.ptr, t.dtype, t.shape);
        if let Some(s) = &t.scales {
            let _ = write!(key, "scales {:?} ", s.block);
            add(key, &s.tensor);
        }
    }
    let mut key = format!("{:?} {};", layer.config, layer.dtype);
    for t in layer.tensors().into_iter().chain(tensors.map(Some)) {
        match t {
            Some(t) => add(&mut key, t),
            None => key.push_str("-;"),
        }
    }
    key
}

impl CudaBackend {
    /// `forward` in graph mode: one launch of the graph captured for a call with the same
    /// buffers and shapes, or (the first time) a capture of the composed layer and its launch.
    pub(crate) fn forward_graphed(
        &self,
        graphs: &ForwardGraphs,
        layer: &Layer<CudaBackend>,
        x: &Tensor<CudaBackend>,
        out: &mut Tensor<CudaBackend>,
        topk_ids: &mut Tensor<CudaBackend>,
        topk_weights: &mut Tensor<CudaBackend>,
    ) -> Result<()> {
        let key = forward_key(layer, [x, out, topk_ids, topk_weights]);
        let mut graphs = graphs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = graphs.iter().position(|(k, _)| *k == key) {
            let hit = graphs.remove(i);
            let r = hit.1.launch();
            graphs.insert(0, hit);
            return r;
        }
        let graph = self.capture(|| moe_hal::forward::composed(self, layer, x, out, topk_ids, topk_weights))?;
        graph.launch()?;
        graphs.insert(0, (key, graph));
        graphs.truncate(FORWARD_GRAPHS);
        Ok(())
    }
}
