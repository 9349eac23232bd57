//! CUDA graphs ([`CudaBackend::capture`]): a captured layer replays bit for bit what `forward`
//! computes, on whatever its input buffer holds at launch; a capture refuses what a graph cannot
//! hold and leaves the backend usable; buffers a graph uses outlive their handles. On the GPU
//! and on the emulator (which records and replays), as [`super::device::backends`] finds them.

use super::device::{Lcg, backends};
use crate::CudaBackend;
use moe_hal::{Backend, DType, Error, HostLayer, HostTensor, Layer, MoeConfig, Routing, Tensor, ops};

const H: usize = 72;
const I: usize = 40;
const E: usize = 16;
const K: usize = 4;

/// A DeepSeek-style layer (sigmoid, grouped routing, a shared expert), bf16 weights, random.
fn layer(rng: &mut Lcg) -> HostLayer {
    let config = MoeConfig {
        hidden: H,
        intermediate: I,
        experts: E,
        top_k: K,
        routing: Routing::SigmoidGrouped { n_group: 4, topk_group: 2, norm_topk_prob: true, routed_scaling_factor: 2.5 },
        shared_intermediate: 24,
    };
    let mut t = |shape: &[usize]| {
        let n = shape.iter().product();
        let scale = (1.0 / *shape.last().unwrap_or(&1) as f32).sqrt();
        HostTensor::from_f32(DType::BF16, shape, &rng.vec(n).iter().map(|v| v * scale).collect::<Vec<_>>()).unwrap()
    };
    let layer = HostLayer {
        router: t(&[E, H]),
        gate_up: t(&[E, 2 * I, H]),
        down: t(&[E, H, I]),
        shared_gate_up: Some(t(&[48, H])),
        shared_down: Some(t(&[H, 24])),
        bias: Some(HostTensor::from_f32(DType::F32, &[E], &rng.vec(E).iter().map(|v| v * 0.1).collect::<Vec<_>>()).unwrap()),
        config,
        dtype: DType::BF16,
    };
    layer.validate().unwrap();
    layer
}

/// The outputs of one layer: `out`, `topk_ids`, `topk_weights`.
struct Outputs {
    out: Tensor<CudaBackend>,
    ids: Tensor<CudaBackend>,
    w: Tensor<CudaBackend>,
}

impl Outputs {
    /// Filled with a pattern no layer computes (NaN, u32::MAX), to see what was written.
    fn new(b: &CudaBackend, t: usize) -> Outputs {
        Outputs {
            out: Tensor::from_f32(b, DType::F32, &[t, H], &vec![f32::NAN; t * H]).unwrap(),
            ids: Tensor::from_u32(b, &[t, K], &vec![u32::MAX; t * K]).unwrap(),
            w: Tensor::from_f32(b, DType::F32, &[t, K], &vec![f32::NAN; t * K]).unwrap(),
        }
    }

    fn forward(&mut self, b: &CudaBackend, l: &Layer<CudaBackend>, x: &Tensor<CudaBackend>) -> moe_hal::Result<()> {
        ops::forward(b, l, x, &mut self.out, &mut self.ids, &mut self.w)
    }

    /// The bits of all three.
    fn read(&self, b: &CudaBackend) -> Bits {
        let bits = |t: &Tensor<CudaBackend>| t.to_f32(b).unwrap().iter().map(|v| v.to_bits()).collect();
        (bits(&self.out), self.ids.to_u32(b).unwrap(), bits(&self.w))
    }
}

/// A random layer and input of `t` tokens on `b` (seeded), and the bits `forward` computes on
/// them, in a fresh [`Outputs`] (returned: it is also the graph's outputs in some tests).
fn layer_input_and_forward(b: &CudaBackend, seed: u64, t: usize) -> (Layer<CudaBackend>, Tensor<CudaBackend>, Outputs, Bits) {
    let mut rng = Lcg(seed);
    let l = Layer::upload(b, &layer(&mut rng)).unwrap();
    let x = Tensor::from_f32(b, DType::F32, &[t, H], &rng.vec(t * H)).unwrap();
    let mut o = Outputs::new(b, t);
    o.forward(b, &l, &x).unwrap();
    let want = o.read(b);
    (l, x, o, want)
}

/// The bits of a layer's `out`, `topk_ids` and `topk_weights`.
type Bits = (Vec<u32>, Vec<u32>, Vec<u32>);

/// At 5 tokens (20 rows over 16 experts: the decode kernels) and 40 (160 rows: the tiles), a
/// captured layer launched twice on two inputs (the second copied into the captured input
/// buffer) gives exactly what `forward` gives on each; capturing runs nothing.
#[test]
fn a_captured_layer_replays_forward_on_new_input() {
    for (name, b) in backends() {
        let mut rng = Lcg(0x5EED_0001);
        let l = Layer::upload(&b, &layer(&mut rng)).unwrap();
        for t in [5usize, 40] {
            let (a, c) = (rng.vec(t * H), rng.vec(t * H));
            let xa = Tensor::from_f32(&b, DType::F32, &[t, H], &a).unwrap();
            let xc = Tensor::from_f32(&b, DType::F32, &[t, H], &c).unwrap();
            // What forward computes on each input.
            let mut eager = Outputs::new(&b, t);
            eager.forward(&b, &l, &xa).unwrap();
            let want_a = eager.read(&b);
            eager.forward(&b, &l, &xc).unwrap();
            let want_c = eager.read(&b);
            assert_ne!(want_a.0, want_c.0, "{name} t {t}: two inputs, one output (the test could not fail)");

            let mut x = Tensor::from_f32(&b, DType::F32, &[t, H], &a).unwrap();
            let mut g = Outputs::new(&b, t);
            let before = g.read(&b);
            let graph = b.capture(|| g.forward(&b, &l, &x)).unwrap();
            assert!(graph.nodes() >= 8, "{name} t {t}: {} nodes", graph.nodes());
            assert_eq!(g.read(&b), before, "{name} t {t}: the capture ran the work");
            graph.launch().unwrap();
            assert_eq!(g.read(&b), want_a, "{name} t {t}: the graph on the first input");
            b.copy(&xc.buf, &mut x.buf).unwrap();
            graph.launch().unwrap();
            assert_eq!(g.read(&b), want_c, "{name} t {t}: the graph on the second input");
            // Launched twice without a look in between, then once more on the first input.
            b.copy(&xa.buf, &mut x.buf).unwrap();
            graph.launch().unwrap();
            graph.launch().unwrap();
            assert_eq!(g.read(&b), want_a, "{name} t {t}: the graph launched twice");
        }
    }
}

/// Each thing a graph cannot hold is an `InvalidArgument` naming it, the work's own error comes
/// back as it was, a panic inside the capture ends it; after all of them the backend computes
/// the layer as before, and captures again.
#[test]
fn a_capture_refuses_what_a_graph_cannot_hold_and_the_backend_goes_on() {
    for (name, b) in backends() {
        let t = 3;
        let (l, x, o, want) = layer_input_and_forward(&b, 0x5EED_0002, t);

        let refused = |what: &str, r: moe_hal::Result<crate::CudaGraph>, needle: &str| match r {
            Err(Error::InvalidArgument(m)) => assert!(m.contains(needle), "{name} {what}: {m}"),
            Err(e) => panic!("{name} {what}: {e}"),
            Ok(_) => panic!("{name} {what}: captured"),
        };
        refused("synchronize", b.capture(|| b.synchronize()), "synchronize");
        refused("download", b.capture(|| o.out.to_f32(&b).map(|_| ())), "download");
        refused("upload", b.capture(|| Tensor::from_f32(&b, DType::F32, &[2], &[1.0, 2.0]).map(|_| ())), "upload");
        refused("nested", b.capture(|| b.capture(|| Ok(())).map(|_| ())), "another capture");
        match b.capture(|| Err(Error::Unsupported("the work's own".into()))) {
            Err(Error::Unsupported(m)) => assert_eq!(m, "the work's own", "{name}"),
            r => panic!("{name}: the work's error came back as {:?}", r.err()),
        }
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.capture(|| panic!("a panic inside the captured work, on purpose: the test checks that it ends the capture"))
        }));
        assert!(panicked.is_err(), "{name}");

        let mut again = Outputs::new(&b, t);
        again.forward(&b, &l, &x).unwrap();
        assert_eq!(again.read(&b), want, "{name}: forward after the refused captures");
        let mut g = Outputs::new(&b, t);
        let graph = b.capture(|| g.forward(&b, &l, &x)).unwrap();
        graph.launch().unwrap();
        assert_eq!(g.read(&b), want, "{name}: a capture after the refused ones");
    }
}

/// The layer's weights and input dropped after the capture stay allocated for the graph (freed
/// with it): launches still compute the layer. On the emulator every allocation ends at a guard
/// page and freed memory is unmapped, so a launch on freed buffers would fault.
#[test]
fn a_graph_keeps_the_buffers_it_uses() {
    for (name, b) in backends() {
        let mut rng = Lcg(0x5EED_0003);
        let host = layer(&mut rng);
        let t = 6;
        let a = rng.vec(t * H);
        let l = Layer::upload(&b, &host).unwrap();
        let x = Tensor::from_f32(&b, DType::F32, &[t, H], &a).unwrap();
        let mut o = Outputs::new(&b, t);
        o.forward(&b, &l, &x).unwrap();
        let want = o.read(&b);

        let l = Layer::upload(&b, &host).unwrap();
        let x = Tensor::from_f32(&b, DType::F32, &[t, H], &a).unwrap();
        let mut g = Outputs::new(&b, t);
        let graph = b.capture(|| g.forward(&b, &l, &x)).unwrap();
        drop((l, x));
        // Memory the dropped buffers would have freed is taken by others now, when it was freed.
        let others: Vec<Tensor<CudaBackend>> =
            (0..8).map(|i| Tensor::from_f32(&b, DType::F32, &[t, H], &vec![i as f32; t * H]).unwrap()).collect();
        graph.launch().unwrap();
        assert_eq!(g.read(&b), want, "{name}: the graph after its layer and input were dropped");
        drop(graph);
        drop(others);
        b.synchronize().unwrap();

        // Outputs allocated inside the capture and kept are the caller's: they hold each
        // launch's results and outlive the graph.
        let l = Layer::upload(&b, &host).unwrap();
        let x = Tensor::from_f32(&b, DType::F32, &[t, H], &a).unwrap();
        let mut kept = None;
        let graph = b
            .capture(|| {
                let mut o = Outputs {
                    out: Tensor::alloc(&b, DType::F32, &[t, H])?,
                    ids: Tensor::alloc(&b, DType::U32, &[t, K])?,
                    w: Tensor::alloc(&b, DType::F32, &[t, K])?,
                };
                o.forward(&b, &l, &x)?;
                kept = Some(o);
                Ok(())
            })
            .unwrap();
        let kept = kept.unwrap();
        graph.launch().unwrap();
        assert_eq!(kept.read(&b), want, "{name}: outputs allocated inside the capture");
        drop(graph);
        assert_eq!(kept.read(&b), want, "{name}: outputs allocated inside the capture, after the graph");

        // A graph dropped inside another capture (which cannot wait for it) is taken apart when
        // that capture ends; the buffers both use stay for the second.
        let mut first = Outputs::new(&b, t);
        let graph = b.capture(|| first.forward(&b, &l, &x)).unwrap();
        graph.launch().unwrap();
        let mut second = Outputs::new(&b, t);
        let graph = b
            .capture(|| {
                drop(graph);
                second.forward(&b, &l, &x)
            })
            .unwrap();
        drop((l, x));
        graph.launch().unwrap();
        assert_eq!(second.read(&b), want, "{name}: a graph captured while another was dropped");
        assert_eq!(first.read(&b), want, "{name}: the dropped graph's launch");
    }
}

/// Another thread's work on the same backend during a capture waits for the capture to end:
/// it is neither refused nor recorded into the graph (the device has one stream, which the
/// capture holds).
#[test]
fn another_threads_work_waits_for_a_capture() {
    for (name, b) in backends() {
        let t = 4;
        let (l, x, mut o, want) = layer_input_and_forward(&b, 0x5EED_0004, t);
        let alone = b.capture(|| o.forward(&b, &l, &x)).unwrap().nodes();

        let started = std::sync::Barrier::new(2);
        let mut g = Outputs::new(&b, t);
        std::thread::scope(|s| {
            let other = s.spawn(|| {
                started.wait();
                let mut mine = Outputs::new(&b, t);
                mine.forward(&b, &l, &x).unwrap();
                mine.read(&b)
            });
            let graph = b
                .capture(|| {
                    started.wait();
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    g.forward(&b, &l, &x)
                })
                .unwrap();
            assert_eq!(other.join().unwrap(), want, "{name}: the other thread's layer");
            assert_eq!(graph.nodes(), alone, "{name}: the other thread's work went into the graph");
            graph.launch().unwrap();
        });
        assert_eq!(g.read(&b), want, "{name}: the graph");
    }
}

/// Captures on one thread while another runs the layer eagerly, over and over: no eager call is
/// refused, recorded into a graph or split between the two (a call that found no capture
/// holds off a capture's beginning until it has enqueued), and every graph holds only its own
/// thread's work. The eager thread pauses between passing the gate and enqueuing, so a capture
/// that could begin in that window would, often.
#[test]
fn captures_and_eager_work_on_two_threads_never_mix() {
    for (name, b) in backends() {
        let t = 4;
        let (l, x, mut o, want) = layer_input_and_forward(&b, 0x5EED_0005, t);
        let alone = b.capture(|| o.forward(&b, &l, &x)).unwrap().nodes();
        let rounds = 24;
        std::thread::scope(|s| {
            let eager = s.spawn(|| {
                crate::graph::PAUSE_AFTER_GATE.with(|p| p.set(std::time::Duration::from_micros(300)));
                for round in 0..rounds {
                    let mut mine = Outputs::new(&b, t);
                    mine.forward(&b, &l, &x).unwrap();
                    assert_eq!(mine.read(&b), want, "{name}: the eager layer, round {round}");
                }
            });
            for round in 0..rounds {
                let mut g = Outputs::new(&b, t);
                let graph = b.capture(|| g.forward(&b, &l, &x)).unwrap();
                assert_eq!(graph.nodes(), alone, "{name}: graph {round} holds another thread's work");
                graph.launch().unwrap();
                assert_eq!(g.read(&b), want, "{name}: graph {round}");
            }
            eager.join().unwrap();
        });
    }
}
