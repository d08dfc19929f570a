//! The fixed kernel registry: every PTX module of `ptx/` embedded at compile
//! time, loaded once per CUDA context, every entry point resolved once.
//! Launches index an array by [`Kernel`]; no name lookup or string building
//! happens on the launch path.

use crate::driver::{self, CtxGuard, CuContext, CuModule, DriverError};
use crate::error::CudaError;
use crate::gemm_table::GEMMS;
use crate::mem::{Func, Stream};
use crate::specs::GemmId;
use crate::specs::module;
pub use crate::specs::{BLOCK, Kernel, KernelSpec};
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
pub(crate) const MODULES: [(&str, &[u8]); 7] = [
    ("util.ptx", ptx!("util.ptx")),
    ("ensemble.ptx", ptx!("ensemble.ptx")),
    ("gating.ptx", ptx!("gating.ptx")),
    ("routing.ptx", ptx!("routing.ptx")),
    ("moe_mma.ptx", ptx!("moe_mma.ptx")),
    ("moe_wgmma.ptx", ptx!("moe_wgmma.ptx")),
    ("gating_v2.ptx", ptx!("gating_v2.ptx")),
];

/// The environment variable naming a folder whose `<module>.ptx` files
/// replace the embedded modules of the same name when [`Kernels`] loads
/// (a kernel-development knob: A/B runs of PTX variants from one binary).
/// A replacement must keep every entry point and its parameter layout; it
/// is not checked against the embedded text. Modules without a file there
/// load as embedded. Unset (the normal case): nothing is read.
pub const PTX_DIR_ENV: &str = "MEDLEY_PTX_DIR";

/// The replacement text of `file` from [`PTX_DIR_ENV`], NUL-terminated, or
/// `None` when the variable is unset or the folder has no such file.
fn override_ptx(file: &str) -> Result<Option<Vec<u8>>, CudaError> {
    override_ptx_in(std::env::var_os(PTX_DIR_ENV).as_deref(), file)
}

/// [`override_ptx`] for the folder `dir` (`None`: no override).
fn override_ptx_in(dir: Option<&std::ffi::OsStr>, file: &str) -> Result<Option<Vec<u8>>, CudaError> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    match std::fs::read(std::path::Path::new(dir).join(file)) {
        Ok(mut text) if !text.contains(&0) => {
            text.push(0);
            Ok(Some(text))
        }
        Ok(_) => Err(CudaError::Unsupported {
            what: "a MEDLEY_PTX_DIR module with a NUL byte inside",
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(_) => Err(CudaError::Unsupported {
            what: "a readable MEDLEY_PTX_DIR module file",
        }),
    }
}

/// Static facts about one loaded entry point.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
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

/// A set of kernel families to load ([`Kernels::load_modules`]); combine
/// with `|`. The small utility module is always loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Modules(u8);

impl Modules {
    /// The fused ensemble softmax (`ensemble.ptx`).
    pub const ENSEMBLE: Modules = Modules(1 << module::ENSEMBLE);
    /// Top-k gating (`gating.ptx`, and the generated `gating_v2.ptx`).
    pub const GATING: Modules = Modules(1 << module::GATING | 1 << module::GATING_V2);
    /// Routing: plan, permute, combine (`routing.ptx`).
    pub const ROUTING: Modules = Modules(1 << module::ROUTING);
    /// The expert GEMMs of both generations (`moe_mma.ptx`, and
    /// `moe_wgmma.ptx` on compute capability 9.0): most of the PTX.
    pub const EXPERTS: Modules = Modules(1 << module::MOE_MMA | 1 << module::MOE_WGMMA);
    /// Everything a full MoE layer runs: gating, routing, experts.
    pub const MOE: Modules = Modules(Self::GATING.0 | Self::ROUTING.0 | Self::EXPERTS.0);
    /// Every kernel.
    pub const ALL: Modules = Modules(u8::MAX);

    /// Whether every family of `other` is in `self`.
    pub const fn contains(self, other: Modules) -> bool {
        self.0 & other.0 == other.0
    }

    fn has_module(self, i: usize) -> bool {
        i == module::UTIL || self.0 & (1 << i) != 0
    }
}

impl core::ops::BitOr for Modules {
    type Output = Modules;
    fn bitor(self, rhs: Modules) -> Modules {
        Modules(self.0 | rhs.0)
    }
}

/// Why [`Kernels::load`] failed: the error, the module being loaded when
/// it happened, and the JIT's error log for that module (the PTX
/// assembler's message when the driver rejected the PTX).
#[derive(Debug, Clone)]
pub struct LoadError {
    /// What failed (a driver code, or an unsupported device).
    pub error: CudaError,
    /// The PTX module (`"gating.ptx"`) whose load failed, if it was one.
    pub module: Option<&'static str>,
    jit_log: String,
}

impl LoadError {
    /// The JIT's error log for [`LoadError::module`] (empty when the failure
    /// was not the JIT's).
    pub fn jit_log(&self) -> &str {
        &self.jit_log
    }
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "loading medley's kernels failed: {}", self.error)?;
        if let Some(m) = self.module {
            write!(f, " (module {m})")?;
        }
        if !self.jit_log.is_empty() {
            write!(f, "; JIT log: {}", self.jit_log)?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

impl From<LoadError> for CudaError {
    fn from(e: LoadError) -> Self {
        e.error
    }
}

enum Inner {
    Load(LoadError),
    Other(CudaError),
}

impl<E: Into<CudaError>> From<E> for Inner {
    fn from(e: E) -> Self {
        Inner::Other(e.into())
    }
}

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
    device_name: String,
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
    ///
    /// The driver JIT-compiles the embedded PTX for the device; a module the
    /// JIT rejects fails the load with the assembler's message
    /// ([`LoadError::jit_log`]). The driver caches JIT output on disk
    /// (`~/.nv/ComputeCache`, `CUDA_CACHE_*`), so the first load on a
    /// machine costs much more than later ones (BENCHMARKS.md has both).
    pub fn load() -> Result<Self, LoadError> {
        Self::load_modules(Modules::ALL)
    }

    /// [`Kernels::load`] of only the kernel families in `modules`: the JIT
    /// compiles only their PTX, so an application that needs, say, only the
    /// ensemble kernels does not pay for the expert GEMMs (most of the PTX;
    /// BENCHMARKS.md has the load times). A launch of a kernel outside the
    /// set is [`CudaError::Unsupported`].
    pub fn load_modules(modules: Modules) -> Result<Self, LoadError> {
        Self::load_inner(modules).map_err(|e| match e {
            Inner::Load(l) => l,
            Inner::Other(error) => LoadError {
                error,
                module: None,
                jit_log: String::new(),
            },
        })
    }

    fn load_inner(wanted: Modules) -> Result<Self, Inner> {
        driver::init()?;
        let ctx = driver::current_context()?;
        if ctx.is_null() {
            return Err(Inner::Other(CudaError::Unsupported {
                what: "no current CUDA context",
            }));
        }
        let dev = driver::current_device()?;
        let sm_count = driver::device_attribute(dev, driver::ATTR_SM_COUNT)? as u32;
        // Only tuning-table lookup uses the name: a failed query gives ""
        // (the fallback table) rather than no kernels.
        let device_name = driver::device_name(dev).unwrap_or_default();
        let cc = (
            driver::device_attribute(dev, driver::ATTR_CC_MAJOR)?,
            driver::device_attribute(dev, driver::ATTR_CC_MINOR)?,
        );
        if cc.0 < 8 {
            return Err(Inner::Other(CudaError::Unsupported {
                what: "compute capability 8.0 or newer",
            }));
        }
        let cooperative = driver::device_attribute(dev, driver::ATTR_COOPERATIVE_LAUNCH)? != 0;
        let smem_optin = driver::device_attribute(dev, driver::ATTR_SMEM_OPTIN)? as u32;
        let mut modules = [core::ptr::null_mut(); MODULES.len()];
        let mut log = Box::new(driver::JitLog::default());
        for (i, (_, ptx)) in MODULES.iter().enumerate() {
            if !wanted.has_module(i) || (i == module::MOE_WGMMA && cc != (9, 0)) {
                continue;
            }
            let replaced = override_ptx(MODULES[i].0);
            let loaded = replaced.and_then(|r| {
                let text: &[u8] = r.as_deref().unwrap_or(ptx);
                CStr::from_bytes_with_nul(text)
                    .map_err(|_| CudaError::Unsupported {
                        what: "a PTX module without its single trailing NUL",
                    })
                    .and_then(|c| driver::module_load_ptx(c, &mut log).map_err(CudaError::from))
            });
            match loaded {
                Ok(m) => modules[i] = m,
                Err(error) => {
                    unload_all(&modules[..i]);
                    return Err(Inner::Load(LoadError {
                        error,
                        module: Some(MODULES[i].0),
                        jit_log: log.error().to_string(),
                    }));
                }
            }
        }
        let mut funcs = [Func {
            raw: core::ptr::null_mut(),
            cooperative: false,
        }; Kernel::ALL.len()];
        let mut info = [KernelInfo::default(); Kernel::ALL.len()];
        for k in Kernel::ALL {
            let KernelSpec {
                module: m,
                entry: name,
                cooperative: coop,
                smem,
                block,
            } = *k.spec();
            if modules[m].is_null() {
                continue;
            }
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
                let blocks_per_sm = unsafe { driver::occupancy(raw, block, smem as usize) }?;
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
                    return Err(Inner::Other(e.into()));
                }
            }
        }
        let mut gemms = [None; GEMMS.len()];
        for (slot, g) in gemms.iter_mut().zip(GEMMS.iter()) {
            let m = match g.generation {
                crate::specs::Generation::Mma => modules[module::MOE_MMA],
                crate::specs::Generation::Wgmma => modules[module::MOE_WGMMA],
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
                    return Err(Inner::Other(e.into()));
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
            device_name,
            cooperative,
        })
    }

    /// Loads the kernels into the context of the caller's `stream`, leaving
    /// the thread's current context as it was.
    ///
    /// # Safety
    /// `stream` must be a valid stream handle (0 and 2 need a current
    /// context).
    pub unsafe fn load_for_stream(stream: driver::CuStream) -> Result<Self, LoadError> {
        // SAFETY: the caller's contract is this function's.
        unsafe { Self::load_modules_for_stream(stream, Modules::ALL) }
    }

    /// [`Kernels::load_modules`] into the context of `stream`.
    ///
    /// # Safety
    /// As [`Kernels::load_for_stream`].
    pub unsafe fn load_modules_for_stream(
        stream: driver::CuStream,
        modules: Modules,
    ) -> Result<Self, LoadError> {
        let ctx = (|| {
            driver::init()?;
            // SAFETY: the caller guarantees the stream handle.
            let ctx = unsafe { driver::stream_context(stream) }?;
            // SAFETY: the driver returned ctx as the live context of the
            // stream.
            unsafe { CtxGuard::push(ctx) }
        })();
        let _g = ctx.map_err(|e| LoadError {
            error: e.into(),
            module: None,
            jit_log: String::new(),
        })?;
        Self::load_modules(modules)
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

    /// The one launch path of every medley kernel: checks that `stream`
    /// belongs to the context the kernels were loaded in
    /// ([`CudaError::WrongContext`] otherwise), makes that context current
    /// for the call if it is not, and launches `f` with `p`, the kernel's
    /// single by-value parameter.
    ///
    /// # Safety
    /// `p` must have exactly the layout of `f`'s parameter, and every device
    /// pointer in it must be valid for everything the kernel reads and
    /// writes at this grid; `smem` must cover the dynamic shared memory the
    /// kernel indexes; `f` must come from this registry.
    pub(crate) unsafe fn launch<P: cust_core::DeviceCopy>(
        &self,
        f: Func,
        grid: u32,
        block: u32,
        smem: u32,
        stream: Stream<'_>,
        p: &P,
    ) -> Result<(), CudaError> {
        // SAFETY: `Stream::from_raw`'s contract makes the handle valid for
        // the view's lifetime (0 and 2 resolve to the current context).
        let ctx = unsafe { driver::stream_context(stream.raw()) }?;
        if ctx != self.ctx {
            return Err(CudaError::WrongContext);
        }
        let _g = self.enter()?;
        if f.raw.is_null() {
            return Err(CudaError::Unsupported {
                what: "a kernel of a family this registry did not load (Kernels::load_modules)",
            });
        }
        let mut value = *p;
        // SAFETY: the caller guarantees the parameter layout and the device
        // pointers; `value` outlives the call (the driver copies parameters
        // at launch); the stream's context is the kernels' (checked above)
        // and is current (`enter`).
        unsafe {
            stream.launch(
                &f,
                grid,
                block,
                smem,
                &[(&raw mut value).cast::<core::ffi::c_void>()],
            )
        }
        .map_err(CudaError::from)
    }

    pub(crate) fn func(&self, k: Kernel) -> &Func {
        &self.funcs[k as usize]
    }

    /// The expert GEMM `id` (an index into [`GEMMS`]), if this device
    /// loaded it (the wgmma generation needs compute capability 9.0).
    pub(crate) fn gemm(&self, id: GemmId) -> Option<&(Func, KernelInfo)> {
        self.gemms[id.index()].as_ref()
    }

    /// Static facts about expert GEMM `id` (an index into
    /// [`crate::experts::GEMMS`]), or `None` where it is not loaded.
    pub fn gemm_info(&self, id: GemmId) -> Option<KernelInfo> {
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

    /// The device's name, as the driver reports it (`NVIDIA H200`): what
    /// [`crate::experts::Tuning::for_kernels`] matches tuning tables by.
    pub fn device_name(&self) -> &str {
        &self.device_name
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ptx_dir_replaces_only_the_modules_it_has() {
        let dir = std::env::temp_dir().join(format!("medley-ptx-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ensemble.ptx"), b"// replaced\n").unwrap();
        std::fs::write(dir.join("gating.ptx"), b"bad\0inside").unwrap();
        let d = Some(dir.as_os_str());
        assert_eq!(
            override_ptx_in(d, "ensemble.ptx").unwrap().unwrap(),
            b"// replaced\n\0"
        );
        assert!(override_ptx_in(d, "routing.ptx").unwrap().is_none());
        assert!(matches!(
            override_ptx_in(d, "gating.ptx"),
            Err(CudaError::Unsupported { .. })
        ));
        assert!(override_ptx_in(None, "ensemble.ptx").unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
