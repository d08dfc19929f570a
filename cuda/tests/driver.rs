//! The driver layer and the registry's contracts on a real GPU: a PTX the
//! JIT rejects fails with the assembler's message, a stream of another
//! context is refused with `WrongContext` before anything is launched, and
//! how long loading the kernels takes (printed: it is JIT compilation).
//!
//! Without a CUDA driver or device every test reports that it was skipped;
//! with `MEDLEY_REQUIRE_GPU=1` that is a failure.

use medley_cuda::driver::{self, JitLog};
use medley_cuda::gating::{Gate, Gating};
use medley_cuda::mem::{DeviceMatrix, DeviceRows};
use medley_cuda::owned::{Buffer, Gpu};
use medley_cuda::{CudaError, Kernel, Kernels, Launch, Modules, Stream};

/// A module with a syntax error on line 4: the JIT must say so.
#[test]
fn a_broken_ptx_fails_with_the_jit_message() {
    let Some(_g) = Gpu::open_or_skip("driver") else {
        return;
    };
    let ptx = c".version 8.0\n.target sm_80\n.address_size 64\n.visible .entry broken() { not_an_instruction %r1; ret; }\n";
    let mut log = JitLog::default();
    let err = driver::module_load_ptx(ptx, &mut log).expect_err("the JIT accepted broken PTX");
    assert_eq!(err.call, "cuModuleLoadDataEx");
    assert_ne!(err.code, 0);
    eprintln!("JIT error {err}: {}", log.error());
    assert!(
        log.error().contains("ptxas") || log.error().contains("error"),
        "the JIT error log is empty or unexpected: {:?}",
        log.error()
    );
}

/// The registry refuses a stream of another context instead of launching
/// there (the kernels' functions do not exist in it).
#[test]
fn a_stream_of_another_context_is_wrong_context() {
    let Some(g) = Gpu::open_or_skip("driver") else {
        return;
    };
    let logits = Buffer::from_slice(&[0.0f32; 8 * 16]).unwrap();
    let ids = Buffer::zeroed(8 * 2 * 4).unwrap();
    let weights = Buffer::zeroed(8 * 2 * 4).unwrap();
    let run = |stream: Stream<'_>| {
        Gate::new(
            DeviceMatrix::F32(DeviceRows::dense(logits.view(8 * 16), 8, 16).unwrap()),
            2,
            &Gating::TopkSoftmax { renormalize: true },
            ids.view_mut(16),
            weights.view_mut(16),
        )
        .launch(g.kernels(), stream)
    };
    // The kernels' own stream works.
    run(g.stream()).expect("gate on the kernels' stream");
    g.synchronize().unwrap();
    // A second, non-primary context with its own stream (`cuCtxCreate`
    // pushes it: it is current from here on; cust's `Context::new` would
    // retain the primary context the kernels live in).
    let dev = cust::device::Device::get_device(0).unwrap();
    let other =
        cust::context::legacy::Context::create_and_push(cust::context::legacy::ContextFlags::empty(), dev)
            .expect("a second context");
    let stream = cust::stream::Stream::new(cust::stream::StreamFlags::DEFAULT, None).unwrap();
    // SAFETY: the stream is live for the call.
    let foreign = unsafe { Stream::from_raw(stream.as_inner().cast()) };
    assert_eq!(run(foreign), Err(CudaError::WrongContext));
    // The legacy default stream (0) is not bound to one context: driver 580
    // reports the kernels' context for it even while the other one is
    // current (seen on an H200), and the launch runs in the kernels'
    // context, which `Kernels::launch` makes current for the call.
    // SAFETY: 0 is the legacy default stream.
    let legacy = unsafe { Stream::from_raw(core::ptr::null_mut()) };
    run(legacy).expect("gate on the legacy default stream");
    drop(stream);
    drop(other);
    // Popped and destroyed: the kernels' own context serves again.
    run(g.stream()).expect("gate on the kernels' stream after the other context is gone");
    g.synchronize().unwrap();
}

/// Times `Kernels::load` and `Kernels::load_modules` per kernel family
/// (the driver JIT-compiles the PTX of every module loaded; its disk cache,
/// unless `CUDA_CACHE_DISABLE=1`, makes later loads faster) and checks that
/// each load resolves the kernels of its families and refuses the others.
#[test]
fn loading_the_kernels_is_timed() {
    let Some(g) = Gpu::open_or_skip("driver") else {
        return;
    };
    eprintln!(
        "load-time: CUDA_CACHE_DISABLE={:?}",
        std::env::var("CUDA_CACHE_DISABLE").unwrap_or_default()
    );
    eprintln!("load-time: Kernels::load (Gpu::open) {:.1} ms", g.load_ms());
    for (name, set) in [
        ("ENSEMBLE", Modules::ENSEMBLE),
        ("GATING|ROUTING", Modules::GATING | Modules::ROUTING),
        ("EXPERTS", Modules::EXPERTS),
        ("ALL", Modules::ALL),
    ] {
        let t0 = std::time::Instant::now();
        let k = Kernels::load_modules(set).unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "load-time: Kernels::load_modules({name}) {:.1} ms",
            t0.elapsed().as_secs_f64() * 1e3
        );
        let has = |k: &Kernels, kernel: Kernel| k.info(kernel).registers > 0;
        assert!(has(&k, Kernel::FillU32));
        assert_eq!(
            has(&k, Kernel::EnsembleV2),
            set.contains(Modules::ENSEMBLE),
            "{name}"
        );
        assert_eq!(
            has(&k, Kernel::GateTopkV2),
            set.contains(Modules::GATING),
            "{name}"
        );
        assert_eq!(
            has(&k, Kernel::GateTopkV3),
            set.contains(Modules::GATING),
            "{name}"
        );
        assert_eq!(
            has(&k, Kernel::GateGroupedV3),
            set.contains(Modules::GATING),
            "{name}"
        );
        assert_eq!(
            has(&k, Kernel::MoeAlign),
            set.contains(Modules::ROUTING),
            "{name}"
        );
        let gemms = medley_cuda::experts::GemmId::all()
            .filter(|&id| k.gemm_info(id).is_some())
            .count();
        assert_eq!(gemms > 0, set.contains(Modules::EXPERTS), "{name}");
        k.destroy().map_err(|(e, _)| e).unwrap();
    }
    // A launch into a family that was not loaded is refused, not attempted.
    let only = Kernels::load_modules(Modules::ENSEMBLE).unwrap_or_else(|e| panic!("{e}"));
    let logits = Buffer::from_slice(&[0.0f32; 4 * 8]).unwrap();
    let ids = Buffer::zeroed(4 * 4).unwrap();
    let weights = Buffer::zeroed(4 * 4).unwrap();
    let r = Gate::new(
        DeviceMatrix::F32(DeviceRows::dense(logits.view(32), 4, 8).unwrap()),
        1,
        &Gating::TopkSoftmax { renormalize: true },
        ids.view_mut(4),
        weights.view_mut(4),
    )
    .launch(&only, g.stream());
    assert!(matches!(r, Err(CudaError::Unsupported { .. })), "{r:?}");
}

/// The public planners answer bad sizes with an error, never a panic or a
/// wrapped product.
#[test]
fn planners_reject_zero_element_sizes_and_huge_shapes() {
    use medley_cuda::ensemble::{v2_plan, workspace_bytes};
    let Some(g) = Gpu::open_or_skip("driver") else {
        return;
    };
    let k = g.kernels();
    for bytes in [0usize, 1, 3, 8, usize::MAX] {
        assert!(
            workspace_bytes(k, 4, 1000, 2, bytes).is_err(),
            "elem_bytes {bytes}"
        );
        assert!(
            v2_plan(k, 4, 1000, 2, bytes, false).is_err(),
            "elem_bytes {bytes}"
        );
    }
    assert!(workspace_bytes(k, 4, 1000, 17, 2).is_err());
    assert!(workspace_bytes(k, usize::MAX, 1000, 2, 2).is_err());
    assert!(workspace_bytes(k, 4, usize::MAX, 2, 2).is_err());
    assert!(workspace_bytes(k, 4, usize::MAX / 2, usize::MAX, 4).is_err());
    assert_eq!(workspace_bytes(k, 0, 1000, 2, 2), Ok(0));
    assert!(workspace_bytes(k, 64, 128_256, 2, 2).unwrap() > 0);
}
