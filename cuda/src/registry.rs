//! The fixed kernel registry: every PTX module of `ptx/` embedded at compile
//! time, loaded once per CUDA context, every entry point resolved once.
//! Launches index an array by [`Kernel`]; no name lookup or string building
//! happens on the launch path.

use crate::driver::{self, CtxGuard, CuContext, CuModule, DriverError};
use crate::error::CudaError;
use crate::gemm_table::GEMMS;
use crate::mem::Func;
use core::ffi::CStr;
use core::mem::ManuallyDrop;

/// Embeds `ptx/<file>` as NUL-terminated bytes (build.rs copies it into
/// `OUT_DIR/ptx/` with the NUL appended, after checking there is none
/// inside).
macro_rules! ptx {
    ($file:literal) => {
        include_bytes!(concat!(env!("OUT_DIR"), "/ptx/", $file))
    };
}

/// The PTX modules, in load order. `moe_wgmma.ptx` (sm_90a) is loaded only
/// on compute capability 9.0; the others on every device medley supports.
pub(crate) const MODULES: [(&str, &[u8]); 6] = [
    ("util.ptx", ptx!("util.ptx")),
    ("ensemble.ptx", ptx!("ensemble.ptx")),
    ("gating.ptx", ptx!("gating.ptx")),
    ("routing.ptx", ptx!("routing.ptx")),
    ("moe_mma.ptx", ptx!("moe_mma.ptx")),
    ("moe_wgmma.ptx", ptx!("moe_wgmma.ptx")),
];
const MODULE_MMA: usize = 4;
const MODULE_WGMMA: usize = 5;

/// Every kernel entry point medley-cuda launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kernel {
    /// `util.ptx: fill_u32`.
    FillU32,
    /// `ensemble.ptx: ensemble_v1` (one block per row, the on-device
    /// reference).
    EnsembleV1,
    /// `ensemble.ptx: ensemble_v2` (rows split over co-resident blocks,
    /// launched cooperatively).
    EnsembleV2,
    /// `gating.ptx: gate_topk` (one warp per token; the on-device
    /// reference).
    GateTopk,
    /// `gating.ptx: gate_topk_v2` (one warp per token, keys in registers;
    /// `E <= 512`; top-k softmax variants).
    GateTopkV2,
    /// `gating.ptx: gate_grouped_v2` (as `gate_topk_v2`, grouped routing).
    GateGroupedV2,
    /// `routing.ptx: moe_align` (the block-padded plan, one block).
    MoeAlign,
    /// `routing.ptx: moe_permute` (gather rows into plan order).
    MoePermute,
    /// `routing.ptx: moe_combine` (weighted k-way combine).
    MoeCombine,
}

/// (module index, entry name, launched cooperatively, most dynamic shared
/// memory per block in bytes: the occupancy the launchers plan with)
type Spec = (usize, &'static CStr, bool, u32);

impl Kernel {
    /// All kernels, in registry order.
    pub const ALL: [Kernel; 9] = [
        Kernel::FillU32,
        Kernel::EnsembleV1,
        Kernel::EnsembleV2,
        Kernel::GateTopk,
        Kernel::GateTopkV2,
        Kernel::GateGroupedV2,
        Kernel::MoeAlign,
        Kernel::MoePermute,
        Kernel::MoeCombine,
    ];

    const fn spec(self) -> Spec {
        match self {
            Kernel::FillU32 => (0, c"fill_u32", false, 0),
            Kernel::EnsembleV1 => (1, c"ensemble_v1", false, 0),
            Kernel::EnsembleV2 => (1, c"ensemble_v2", true, crate::ensemble::V2_MAX_SMEM),
            Kernel::GateTopk => (
                2,
                c"gate_topk",
                false,
                crate::gating::gate_smem(crate::gating::MAX_DEVICE_EXPERTS),
            ),
            Kernel::GateTopkV2 => (
                2,
                c"gate_topk_v2",
                false,
                crate::gating::gate_smem(crate::gating::V2_MAX_EXPERTS),
            ),
            Kernel::GateGroupedV2 => (
                2,
                c"gate_grouped_v2",
                false,
                crate::gating::gate_smem(crate::gating::V2_MAX_EXPERTS),
            ),
            Kernel::MoeAlign => (
                3,
                c"moe_align",
                false,
                crate::routing::align_smem(crate::routing::MAX_ALIGN_EXPERTS),
            ),
            Kernel::MoePermute => (3, c"moe_permute", false, 0),
            Kernel::MoeCombine => (3, c"moe_combine", false, 0),
        }
    }

    /// The PTX entry name.
    pub const fn entry(self) -> &'static CStr {
        self.spec().1
    }
}

/// Static facts about one loaded entry point.
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelInfo {
    /// Registers per thread (from the driver's JIT).
    pub registers: u32,
    /// Resident blocks per multiprocessor at the kernel's block size (and
    /// its planned dynamic shared memory).
    pub blocks_per_sm: u32,
    /// Dynamic shared memory the kernel may use per block on this device
    /// (its plan, capped by the device's opt-in limit).
    pub max_dynamic_smem: u32,
}

/// Block size every medley kernel is written for.
pub const BLOCK: u32 = 256;

/// The kernels of one CUDA context, loaded and resolved.
#[derive(Debug)]
pub struct Kernels {
    ctx: CuContext,
    modules: [CuModule; MODULES.len()],
    funcs: [Func; Kernel::ALL.len()],
    info: [KernelInfo; Kernel::ALL.len()],
    gemms: [Option<(Func, KernelInfo)>; GEMMS.len()],
    sm_count: u32,
    compute_capability: (i32, i32),
    cooperative: bool,
}

// SAFETY: module and function handles are context-bound tokens; every use
// makes the owning context current first (`Kernels::enter`), and the CUDA
// driver API is thread-safe for these objects.
unsafe impl Send for Kernels {}
// SAFETY: as above; no method mutates shared state.
unsafe impl Sync for Kernels {}

impl Kernels {
    /// Loads every module into the calling thread's current context (which
    /// must exist: medley never creates one).
    pub fn load() -> Result<Self, CudaError> {
        driver::init()?;
        let ctx = driver::current_context()?;
        if ctx.is_null() {
            return Err(CudaError::Unsupported {
                what: "no current CUDA context",
            });
        }
        let dev = driver::current_device()?;
        let sm_count = driver::device_attribute(dev, driver::ATTR_SM_COUNT)? as u32;
        let cc = (
            driver::device_attribute(dev, driver::ATTR_CC_MAJOR)?,
            driver::device_attribute(dev, driver::ATTR_CC_MINOR)?,
        );
        if cc.0 < 8 {
            return Err(CudaError::Unsupported {
                what: "compute capability 8.0 or newer",
            });
        }
        let cooperative = driver::device_attribute(dev, driver::ATTR_COOPERATIVE_LAUNCH)? != 0;
        let smem_optin = driver::device_attribute(dev, driver::ATTR_SMEM_OPTIN)? as u32;
        let mut modules = [core::ptr::null_mut(); MODULES.len()];
        for (i, (_, ptx)) in MODULES.iter().enumerate() {
            if i == MODULE_WGMMA && cc != (9, 0) {
                continue;
            }
            let loaded = CStr::from_bytes_with_nul(ptx)
                .map_err(|_| CudaError::Unsupported {
                    what: "an embedded PTX module without its single trailing NUL",
                })
                .and_then(|c| driver::module_load_ptx(c).map_err(CudaError::from));
            match loaded {
                Ok(m) => modules[i] = m,
                Err(e) => {
                    unload_all(&modules[..i]);
                    return Err(e);
                }
            }
        }
        let mut funcs = [Func {
            raw: core::ptr::null_mut(),
            cooperative: false,
        }; Kernel::ALL.len()];
        let mut info = [KernelInfo::default(); Kernel::ALL.len()];
        for k in Kernel::ALL {
            let (m, name, coop, smem) = k.spec();
            let resolved = (|| -> Result<(Func, KernelInfo), DriverError> {
                // SAFETY: modules[m] was loaded above in the current context.
                let raw = unsafe { driver::module_function(modules[m], name) }?;
                // Above 48 KiB in all (static + dynamic) a kernel must opt in
                // to its dynamic shared memory; never ask for more than the
                // device allows (launchers check their need against
                // max_dynamic_smem).
                // SAFETY: raw was just resolved from a live module.
                let static_smem =
                    unsafe { driver::function_attribute(raw, driver::FUNC_ATTR_SHARED_SIZE) }? as u32;
                let smem = smem.min(smem_optin.saturating_sub(static_smem));
                if smem > 0 {
                    // SAFETY: as above.
                    unsafe {
                        driver::set_function_attribute(raw, driver::FUNC_ATTR_MAX_DYNAMIC_SMEM, smem as i32)
                    }?;
                }
                // SAFETY: raw was just resolved from a live module.
                let registers =
                    unsafe { driver::function_attribute(raw, driver::FUNC_ATTR_NUM_REGS) }? as u32;
                // SAFETY: as above.
                let blocks_per_sm = unsafe { driver::occupancy(raw, BLOCK, smem as usize) }?;
                Ok((
                    Func {
                        raw,
                        cooperative: coop,
                    },
                    KernelInfo {
                        registers,
                        blocks_per_sm,
                        max_dynamic_smem: smem,
                    },
                ))
            })();
            match resolved {
                Ok((f, i)) => {
                    funcs[k as usize] = f;
                    info[k as usize] = i;
                }
                Err(e) => {
                    unload_all(&modules);
                    return Err(e.into());
                }
            }
        }
        let mut gemms = [None; GEMMS.len()];
        for (slot, g) in gemms.iter_mut().zip(GEMMS.iter()) {
            let m = match g.generation {
                crate::experts::Generation::Mma => modules[MODULE_MMA],
                crate::experts::Generation::Wgmma => modules[MODULE_WGMMA],
            };
            if m.is_null() {
                continue;
            }
            let resolved = (|| -> Result<Option<(Func, KernelInfo)>, DriverError> {
                // SAFETY: m was loaded above in the current context.
                let raw = unsafe { driver::module_function(m, g.entry) }?;
                if g.smem > smem_optin {
                    return Ok(None);
                }
                // SAFETY: raw was just resolved from a live module.
                unsafe {
                    driver::set_function_attribute(raw, driver::FUNC_ATTR_MAX_DYNAMIC_SMEM, g.smem as i32)
                }?;
                // SAFETY: as above.
                let registers =
                    unsafe { driver::function_attribute(raw, driver::FUNC_ATTR_NUM_REGS) }? as u32;
                // SAFETY: as above.
                let blocks_per_sm = unsafe { driver::occupancy(raw, g.threads, g.smem as usize) }?;
                Ok(Some((
                    Func {
                        raw,
                        cooperative: false,
                    },
                    KernelInfo {
                        registers,
                        blocks_per_sm,
                        max_dynamic_smem: g.smem,
                    },
                )))
            })();
            match resolved {
                Ok(f) => *slot = f,
                Err(e) => {
                    unload_all(&modules);
                    return Err(e.into());
                }
            }
        }
        Ok(Kernels {
            ctx,
            modules,
            funcs,
            info,
            gemms,
            sm_count,
            compute_capability: cc,
            cooperative,
        })
    }

    /// Loads the kernels into the context of the caller's `stream`, leaving
    /// the thread's current context as it was.
    ///
    /// # Safety
    /// `stream` must be a valid stream handle (0 and 2 need a current
    /// context).
    pub unsafe fn load_for_stream(stream: driver::CuStream) -> Result<Self, CudaError> {
        driver::init()?;
        // SAFETY: the caller guarantees the stream handle.
        let ctx = unsafe { driver::stream_context(stream) }?;
        // SAFETY: the driver returned ctx as the live context of the stream.
        let _g = unsafe { CtxGuard::push(ctx) }?;
        Self::load()
    }

    /// Makes the kernels' context current for the guard's lifetime if it
    /// is not already.
    pub(crate) fn enter(&self) -> Result<Option<CtxGuard>, CudaError> {
        if driver::current_context()? == self.ctx {
            return Ok(None);
        }
        // SAFETY: self.ctx is the live context the modules were loaded in
        // (the registry is destroyed before its context by contract).
        Ok(Some(unsafe { CtxGuard::push(self.ctx) }?))
    }

    pub(crate) fn func(&self, k: Kernel) -> &Func {
        &self.funcs[k as usize]
    }

    /// The expert GEMM `id` (an index into [`GEMMS`]), if this device
    /// loaded it (the wgmma generation needs compute capability 9.0).
    pub(crate) fn gemm(&self, id: usize) -> Option<&(Func, KernelInfo)> {
        self.gemms.get(id).and_then(|g| g.as_ref())
    }

    /// Static facts about expert GEMM `id` (an index into
    /// [`crate::experts::GEMMS`]), or `None` where it is not loaded.
    pub fn gemm_info(&self, id: usize) -> Option<KernelInfo> {
        self.gemm(id).map(|g| g.1)
    }

    /// Static facts about a loaded kernel.
    pub fn info(&self, k: Kernel) -> KernelInfo {
        self.info[k as usize]
    }

    /// The context the kernels live in.
    pub fn context(&self) -> CuContext {
        self.ctx
    }

    /// Multiprocessors of the device.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Whether the device supports cooperative launches (needed by the
    /// split-row kernels).
    pub fn cooperative(&self) -> bool {
        self.cooperative
    }

    /// Unloads the modules, reporting a failure (for example an earlier
    /// asynchronous error surfacing). On error the registry is handed back.
    // Handing the registry back on failure is the point (cust's DropResult
    // pattern): boxing it would allocate on the teardown path.
    #[allow(clippy::result_large_err)]
    pub fn destroy(self) -> Result<(), (CudaError, Self)> {
        let me = ManuallyDrop::new(self);
        let guard = match me.enter() {
            Ok(g) => g,
            Err(e) => return Err((e, ManuallyDrop::into_inner(me))),
        };
        for (i, m) in me.modules.iter().enumerate() {
            if m.is_null() {
                continue;
            }
            // SAFETY: each module was loaded in me.ctx, now current, and is
            // unloaded once (the registry is consumed).
            if let Err(e) = unsafe { driver::module_unload(*m) } {
                // Modules before i are gone; hand back only what remains.
                let mut rest = ManuallyDrop::into_inner(me);
                for done in rest.modules[..i].iter_mut() {
                    *done = core::ptr::null_mut();
                }
                drop(guard);
                return Err((e.into(), rest));
            }
        }
        drop(guard);
        Ok(())
    }
}

fn unload_all(modules: &[CuModule]) {
    for &m in modules.iter().filter(|m| !m.is_null()) {
        // SAFETY: m was loaded in the current context and is dropped once.
        let _ = unsafe { driver::module_unload(m) };
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        if let Ok(_g) = self.enter() {
            unload_all(&self.modules);
        }
    }
}
