//! `moe bench --cuda-graphs`: the CUDA backend's layer captured once per token count as a CUDA
//! graph ([`moe_cuda::CudaBackend::capture`]) and replayed, as inference engines run decode, so
//! the bench shows what the host's launch and allocation work costs beside the eager `forward`.
//! `bench/peers/gpu_peers.py --cuda-graphs` times its peers the same way.
//!
//! The bench is generic over the backend; a graph is the CUDA backend's own API, reached here by
//! downcasting (`Backend: 'static`), so no other backend sees it.

use std::any::Any;
use std::time::Instant;

use moe_cuda::{CudaBackend, CudaGraph};
use moe_hal::{Backend, Error, Layer, Result, Tensor, ops};

/// The name of a backend's graph run in tables and JSON (`cuda+cudagraph`), as the peers script
/// names its graph runs.
pub fn run_name(backend: &str) -> String {
    format!("{backend}+cudagraph")
}

/// Whether `b` can capture graphs (the CUDA backend, on a GPU or its emulator).
pub fn can_capture<B: Backend>(b: &B) -> bool {
    (b as &dyn Any).is::<CudaBackend>()
}

/// A layer of one token count captured as a graph, on its own input buffer.
pub struct Replay<B: Backend> {
    graph: CudaGraph,
    /// The buffer the graph reads its input from: each batch is copied in before a launch.
    x: Tensor<B>,
}

/// `Some` of the concrete CUDA object behind a generic one, when `B` is the CUDA backend.
fn cuda<T: Any, U: Any>(v: &T) -> Option<&U> {
    (v as &dyn Any).downcast_ref::<U>()
}

fn cuda_mut<T: Any, U: Any>(v: &mut T) -> Option<&mut U> {
    (v as &mut dyn Any).downcast_mut::<U>()
}

impl<B: Backend> Replay<B> {
    /// Captures `forward(layer, x, out, ids, w)` with `x` a copy of `first`, and checks that one
    /// launch computes exactly what `forward` does on it: a graph that computed something else
    /// would be timed for nothing. Run `forward` on this shape first (the warm-up does), so
    /// every kernel it uses is loaded.
    pub fn capture(
        b: &B,
        layer: &Layer<B>,
        first: &Tensor<B>,
        out: &mut Tensor<B>,
        ids: &mut Tensor<B>,
        w: &mut Tensor<B>,
    ) -> Result<Replay<B>> {
        let mut x = Tensor::alloc(b, first.dtype, &first.shape)?;
        b.copy(&first.buf, &mut x.buf)?;
        let not_cuda = || Error::Unsupported(format!("{} cannot capture CUDA graphs", b.info().name));
        let cb: &CudaBackend = cuda(b).ok_or_else(not_cuda)?;
        let graph = {
            let (cl, cx) =
                (cuda::<_, Layer<CudaBackend>>(layer).ok_or_else(not_cuda)?, cuda::<_, Tensor<CudaBackend>>(&x).ok_or_else(not_cuda)?);
            let co = cuda_mut::<_, Tensor<CudaBackend>>(out).ok_or_else(not_cuda)?;
            let ci = cuda_mut::<_, Tensor<CudaBackend>>(ids).ok_or_else(not_cuda)?;
            let cw = cuda_mut::<_, Tensor<CudaBackend>>(w).ok_or_else(not_cuda)?;
            cb.capture(|| ops::forward(cb, cl, cx, co, ci, cw))?
        };
        graph.launch()?;
        let got = (out.to_bytes(b)?, ids.to_bytes(b)?, w.to_bytes(b)?);
        ops::forward(b, layer, &x, out, ids, w)?;
        let want = (out.to_bytes(b)?, ids.to_bytes(b)?, w.to_bytes(b)?);
        if got != want {
            let differ = got.0.chunks(4).zip(want.0.chunks(4)).filter(|(g, w)| g != w).count();
            return Err(Error::Driver(format!(
                "the CUDA graph computed another layer than forward did on the same input ({differ} of {} outputs differ)",
                want.0.len() / 4
            )));
        }
        Ok(Replay { graph, x })
    }

    /// Seconds of one launch on `x` (copied into the graph's input first, untimed), from enqueue
    /// to the end of a synchronize, as the eager rows are timed.
    pub fn time(&mut self, b: &B, x: &Tensor<B>) -> Result<f64> {
        b.copy(&x.buf, &mut self.x.buf)?;
        b.synchronize()?;
        let start = Instant::now();
        self.graph.launch()?;
        b.synchronize()?;
        Ok(start.elapsed().as_secs_f64())
    }
}
