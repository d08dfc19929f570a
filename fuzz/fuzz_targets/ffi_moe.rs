//! The MoE entry points of the `ffi` target: the CPU ones (grouped gating,
//! the block-padded plan and its size query, the whole layer and its
//! scratch query) with real buffers, null, misaligned, short, overflowing
//! and overlapping ones, huge shapes and arbitrary enum values; the GPU
//! ones for their argument checks (no engine can exist here: every call
//! must fail and write nothing). Asserts as the rest of the target: known
//! statuses, no panic, a failed call writes nothing, no call writes past
//! its lengths, inputs are never written.

use super::*;

/// A small count, sometimes huge.
fn count(r: &mut Bytes<'_>, small: usize) -> usize {
    if r.u8() % 8 == 0 {
        r.size()
    } else {
        r.below(small + 1)
    }
}

/// A buffer of `n` expert ids: mostly valid for `e` experts, sometimes
/// routed nowhere or out of range.
fn ids_buf(r: &mut Bytes<'_>, n: usize, e: usize) -> Buf<u32> {
    let mut b = Buf::new(n, 0u32);
    for v in b.v.iter_mut().take(n) {
        *v = match r.u8() % 16 {
            0 => u32::MAX,
            1 => r.u32(),
            _ => r.below(e.max(1)) as u32,
        };
    }
    b.fill = 0;
    b
}

fn f32_buf(r: &mut Bytes<'_>, n: usize) -> Buf<f32> {
    let mut b = Buf::new(n, 0.0f32);
    for v in b.v.iter_mut().take(n) {
        *v = r.f32();
    }
    b.fill = 0.0;
    b
}

fn snapshot<T: Copy>(b: &Buf<T>) -> Vec<T> {
    b.v.clone()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn grouped(r: &mut Bytes<'_>) {
    let mut store = Vec::new();
    let x = rows(r, &mut store);
    let mut cfg = init(medley_moe_grouped_config_init);
    if r.u8() % 2 == 0 {
        cfg.k = count(r, 9);
        cfg.scoring = r.enum_value(2);
        cfg.group_score = r.enum_value(2);
        cfg.n_group = count(r, 9);
        cfg.topk_group = count(r, 5);
        cfg.renormalize = r.u32() % 3;
        cfg.routed_scaling_factor = r.param();
    }
    if r.u8() % 16 == 0 {
        cfg.struct_size = r.size();
    }
    let e = x.len.min(64);
    let mut bias = f32_buf(r, e);
    let bias_before = snapshot(&bias);
    let (bp, bl) = if r.u8() % 3 == 0 {
        (null_mut(), 0)
    } else {
        bias.arg(r)
    };
    let n = x.rows.min(8).saturating_mul(cfg.k.min(8));
    let mut ids = Buf::new(n, 7u32);
    let mut w = Buf::new(n, SENTINEL);
    let (ip, il) = ids.arg(r);
    let (mut wp, wl) = w.arg(r);
    if r.u8() % 16 == 0 {
        wp = ip.cast();
    }
    let mut rep = medley_report {
        struct_size: size_of::<medley_report>(),
        masked_rows: 99,
        nan_rows: 99,
    };
    let rp = if r.u8() % 4 == 0 {
        null_mut()
    } else {
        &mut rep as *mut _
    };
    let xp = if r.u8() % 32 == 0 { null() } else { &x as *const _ };
    let cp = if r.u8() % 32 == 0 {
        null()
    } else {
        &cfg as *const _
    };
    let s = unsafe { medley_moe_grouped_topk(xp, cp, bp.cast_const(), bl, ip, il, wp, wl, rp) };
    known(s);
    if s != medley_status::Ok {
        assert!(ids.untouched() && w.untouched(), "{s:?} wrote");
        assert_eq!((rep.masked_rows, rep.nan_rows), (99, 99));
    }
    assert!(ids.guard_intact() && w.guard_intact());
    assert!(same_bits(&bias.v, &bias_before), "the bias was written");
}

fn padded_len(r: &mut Bytes<'_>) {
    let (mut a, mut b) = (5usize, 6usize);
    let (slots, l, bm) = (r.size(), r.size(), count(r, 300));
    let (pa, pb): (*mut usize, *mut usize) = match r.u8() % 8 {
        0 => (null_mut(), &mut b),
        1 => (&mut a, &mut a),
        2 => ((&mut a as *mut usize).cast::<u8>().wrapping_add(1).cast(), &mut b),
        _ => (&mut a, &mut b),
    };
    let s = unsafe { medley_moe_block_padded_len(slots, l, bm, pa, pb) };
    known(s);
    if s != medley_status::Ok {
        assert_eq!((a, b), (5, 6), "{s:?} wrote");
    } else {
        assert!(b > 0 || a == 0);
        assert_eq!(a, b * bm);
    }
}

fn align(r: &mut Bytes<'_>) {
    let n = count(r, 48).min(64);
    let e = if r.u8() % 8 == 0 {
        r.size()
    } else {
        1 + r.below(12)
    };
    let ids = ids_buf(r, n, e);
    let ids_before = snapshot(&ids);
    let mut ids = ids;
    let (idp, idl) = ids.arg(r);
    let first = if r.u8() % 8 == 0 {
        r.u32()
    } else {
        r.below(e.min(16)) as u32
    };
    let last = if r.u8() % 8 == 0 {
        r.u32()
    } else {
        first.saturating_add(r.below(e.min(16) + 1) as u32)
    };
    let range = medley_moe_range { first, last };
    let bm = count(r, 9);
    let l = last.saturating_sub(first) as usize;
    let (len, blocks) = {
        let (mut a, mut b) = (0usize, 0usize);
        if unsafe { medley_moe_block_padded_len(n, l, bm, &mut a, &mut b) } == medley_status::Ok && a <= 4096
        {
            (a, b)
        } else {
            (r.below(64), r.below(16))
        }
    };
    let mut sorted = Buf::new(len, 0xA5A5_A5A5u32);
    let mut bexp = Buf::new(blocks, 0xA5A5_A5A5u32);
    let mut off = Buf::new(l.min(64) + 1, 0xA5A5_A5A5_A5A5_A5A5u64);
    let mut inv = Buf::new(n, 0xA5A5_A5A5u32);
    let mut total = Buf::new(1, 0xA5A5_A5A5u32);
    let mut out = init(medley_moe_align_output_init);
    (out.sorted_ids, out.sorted_ids_len) = sorted.arg(r);
    (out.block_experts, out.block_experts_len) = bexp.arg(r);
    (out.offsets, out.offsets_len) = off.arg(r);
    if r.u8() % 3 != 0 {
        (out.inverse, out.inverse_len) = inv.arg(r);
    }
    if r.u8() % 3 != 0 {
        out.total = total.v.as_mut_ptr();
    }
    if r.u8() % 16 == 0 {
        // An output aliasing the ids (in bounds).
        out.inverse = idp;
        out.inverse_len = idl.min(n);
    }
    if r.u8() % 32 == 0 {
        out.struct_size = r.size();
    }
    let op = if r.u8() % 32 == 0 {
        null()
    } else {
        &out as *const _
    };
    let s = unsafe { medley_moe_align_block_size(idp.cast_const(), idl, e, range, bm, op) };
    known(s);
    if s != medley_status::Ok {
        assert!(
            sorted.untouched() && bexp.untouched() && off.untouched() && inv.untouched() && total.untouched(),
            "{s:?} wrote"
        );
        if out.inverse != idp {
            assert_eq!(ids.v, ids_before, "{s:?} wrote the ids");
        }
    }
    assert!(sorted.guard_intact() && bexp.guard_intact() && off.guard_intact() && inv.guard_intact());
    assert!(total.guard_intact());
}

fn layer(r: &mut Bytes<'_>) {
    let mut store = Vec::new();
    let mut x = rows(r, &mut store);
    let (h, i) = (count(r, 24), count(r, 24));
    if r.u8() % 2 == 0 {
        // Mostly consistent shapes, so that calls get past the checks.
        x.len = h;
        x.stride = 0;
        // Every word holds at least one element of any dtype.
        x.rows = x.rows.min((store[0].v.len() - GUARD) / h.max(1));
        x.data_len = x.rows * h;
    }
    let t = x.rows;
    let k = count(r, 4);
    let e = if r.u8() % 8 == 0 { r.size() } else { 1 + r.below(8) };
    let first = r.below(e.min(8)) as u32;
    let last = if r.u8() % 8 == 0 {
        r.u32()
    } else {
        first + r.below(e.min(8) - first as usize + 1) as u32
    };
    let l = last.saturating_sub(first) as usize;
    let wdt = r.enum_value(3);
    let n13 = l
        .min(8)
        .saturating_mul(2 * i.min(64))
        .saturating_mul(h.min(64))
        .min(1 << 14);
    let n2 = l
        .min(8)
        .saturating_mul(h.min(64))
        .saturating_mul(i.min(64))
        .min(1 << 14);
    let mk = |r: &mut Bytes<'_>, n: usize| {
        let mut b = Buf::new(n, 0u32);
        for v in b.v.iter_mut().take(n) {
            *v = r.f32().to_bits() & 0xBFFF_BFFF; // keep magnitudes small in every dtype
        }
        b.fill = 0;
        b
    };
    let mut w13 = mk(r, n13);
    let mut w2 = mk(r, n2);
    let (p13, l13) = w13.arg(r);
    let (p2, l2) = w2.arg(r);
    let nslots = t.min(8).saturating_mul(k.min(8));
    let mut ids = ids_buf(r, nslots, e);
    let mut rw = f32_buf(r, nslots);
    let (ip, il) = ids.arg(r);
    let (rwp, rwl) = rw.arg(r);
    let ex = medley_moe_experts {
        w13: p13.cast_const().cast(),
        w13_len: elems(r, l13, wdt, n13),
        w2: p2.cast_const().cast(),
        w2_len: elems(r, l2, wdt, n2),
        dtype: wdt,
        hidden: h,
        inter: i,
        range: medley_moe_range { first, last },
    };
    let ro = medley_moe_routing {
        ids: ip.cast_const(),
        ids_len: il,
        weights: rwp.cast_const(),
        weights_len: rwl,
        k,
        experts: e,
    };
    let mut need = 0usize;
    let s = unsafe { medley_moe_layer_scratch_bytes(t, k, h, i, l, &mut need) };
    known(s);
    let mut scratch = Buf::new(need.min(1 << 18).div_ceil(8), 0u64);
    let (sp, sl) = scratch.arg(r);
    let sbytes = if sl > isize::MAX as usize / 8 {
        usize::MAX
    } else {
        (sl * 8).min(need.max(r.below(64)))
    };
    let odt = r.enum_value(3);
    let on = t.min(8).saturating_mul(h.min(64));
    let mut out = Buf::new(on, 0x5A5A_5A5Au32);
    let (mut op, ol) = out.arg(r);
    let mut ol = elems(r, ol, odt, on);
    if r.u8() % 16 == 0 {
        // The output in the routing weights.
        op = rwp.cast();
        ol = rwl.min(on);
    }
    let ostride = if r.u8() % 4 == 0 { r.size() } else { 0 };
    let mut rep = medley_report {
        struct_size: size_of::<medley_report>(),
        masked_rows: 99,
        nan_rows: 99,
    };
    let rp = if r.u8() % 4 == 0 {
        null_mut()
    } else {
        &mut rep as *mut _
    };
    let (w13_before, w2_before, ids_before) = (snapshot(&w13), snapshot(&w2), snapshot(&ids));
    let s = unsafe { medley_moe_layer(&x, &ex, &ro, sp.cast(), sbytes, op.cast(), ol, odt, ostride, rp) };
    known(s);
    if s != medley_status::Ok {
        assert!(out.untouched(), "{s:?} wrote");
        assert_eq!((rep.masked_rows, rep.nan_rows), (99, 99));
    }
    assert!(out.guard_intact() && scratch.guard_intact());
    assert_eq!(w13.v, w13_before);
    assert_eq!(w2.v, w2_before);
    assert_eq!(ids.v, ids_before);
}

/// Device address: 0, aligned, or not.
fn daddr(r: &mut Bytes<'_>) -> u64 {
    match r.u8() % 4 {
        0 => 0,
        1 => r.u32() as u64,
        _ => (r.u32() as u64) << 8,
    }
}

fn drows(r: &mut Bytes<'_>) -> medley_cuda_rows {
    medley_cuda_rows {
        data: daddr(r),
        data_len: count(r, 4096),
        dtype: r.enum_value(3),
        rows: count(r, 64),
        len: count(r, 128),
        stride: if r.u8() % 4 == 0 { r.size() } else { 0 },
    }
}

fn gpu(r: &mut Bytes<'_>) {
    let st = null_mut();
    let ne: *const medley_cuda_engine = null();
    let range = medley_moe_range {
        first: r.u32() % 20,
        last: r.u32() % 40,
    };
    let s = unsafe {
        match r.u8() % 9 {
            0 => {
                let x = drows(r);
                let mut cfg = init(medley_moe_grouped_config_init);
                cfg.k = count(r, 9);
                cfg.scoring = r.enum_value(2);
                cfg.n_group = count(r, 9);
                let (b, bl, i, il, w, wl) = (
                    daddr(r),
                    count(r, 256),
                    daddr(r),
                    count(r, 512),
                    daddr(r),
                    count(r, 512),
                );
                medley_cuda_moe_grouped_topk(ne, st, &x, &cfg, b, bl, i, il, w, wl)
            }
            1 => {
                let mut o = init(medley_cuda_moe_align_output_init);
                o.sorted_ids = daddr(r);
                o.sorted_ids_len = count(r, 1024);
                o.block_experts = daddr(r);
                o.block_experts_len = count(r, 64);
                o.total = daddr(r);
                o.offsets = daddr(r);
                o.offsets_len = count(r, 40);
                o.inverse = daddr(r);
                o.inverse_len = count(r, 512);
                medley_cuda_moe_align(
                    ne,
                    st,
                    daddr(r),
                    count(r, 512),
                    count(r, 40),
                    range,
                    count(r, 128),
                    &o,
                )
            }
            2 => {
                let (x, o) = (drows(r), drows(r));
                medley_cuda_moe_permute(ne, st, &x, count(r, 8), daddr(r), count(r, 1024), daddr(r), &o)
            }
            3 | 4 => {
                let plan = medley_cuda_moe_plan {
                    sorted_ids: daddr(r),
                    sorted_ids_len: count(r, 1024),
                    block_experts: daddr(r),
                    block_experts_len: count(r, 64),
                    total: daddr(r),
                    block_m: count(r, 128),
                    slots: count(r, 512),
                    k: count(r, 8),
                };
                let (a, w, o) = (drows(r), drows(r), drows(r));
                let g = r.enum_value(120);
                if r.u8() % 2 == 0 {
                    medley_cuda_moe_gemm1(ne, st, g, &a, r.u32(), &plan, &w, &o)
                } else {
                    medley_cuda_moe_gemm2(ne, st, g, &a, &plan, &w, daddr(r), count(r, 512), &o)
                }
            }
            5 => {
                let (y, o) = (drows(r), drows(r));
                medley_cuda_moe_combine(
                    ne,
                    st,
                    &y,
                    count(r, 40),
                    daddr(r),
                    count(r, 512),
                    daddr(r),
                    count(r, 512),
                    r.u32(),
                    &o,
                )
            }
            6 => {
                let mut c = init(medley_cuda_moe_choice_init);
                c.gemm1 = 77;
                if r.u8() % 8 == 0 {
                    c.struct_size = r.size();
                }
                let before = c;
                let cp = if r.u8() % 16 == 0 {
                    null_mut()
                } else {
                    &mut c as *mut _
                };
                let s = medley_cuda_moe_choose(ne, r.enum_value(3), r.size(), r.size(), r.enum_value(3), cp);
                assert_eq!(c, before, "a failed choose wrote");
                s
            }
            7 => {
                let c = medley_cuda_moe_choice {
                    gemm1: r.enum_value(120),
                    gemm2: r.enum_value(120),
                    block_m: count(r, 256),
                    ..init(medley_cuda_moe_choice_init)
                };
                let mut bytes = 3usize;
                let s = medley_cuda_moe_layer_workspace_bytes(
                    &c,
                    r.size(),
                    count(r, 8),
                    r.size(),
                    count(r, 512),
                    count(r, 512),
                    r.enum_value(3),
                    &mut bytes,
                );
                known(s);
                if s != medley_status::Ok {
                    assert_eq!(bytes, 3, "{s:?} wrote");
                }
                // A query needs no engine: it may succeed.
                return;
            }
            _ => {
                let c = medley_cuda_moe_choice {
                    gemm1: r.enum_value(120),
                    gemm2: r.enum_value(120),
                    block_m: count(r, 256),
                    ..init(medley_cuda_moe_choice_init)
                };
                let ex = medley_cuda_moe_experts {
                    w13: daddr(r),
                    w13_len: r.size(),
                    w2: daddr(r),
                    w2_len: r.size(),
                    dtype: r.enum_value(3),
                    hidden: count(r, 512),
                    inter: count(r, 512),
                    range,
                };
                let ro = medley_cuda_moe_routing {
                    ids: daddr(r),
                    ids_len: count(r, 512),
                    weights: daddr(r),
                    weights_len: count(r, 512),
                    k: count(r, 8),
                    experts: count(r, 40),
                };
                let (x, o) = (drows(r), drows(r));
                medley_cuda_moe_layer(ne, st, &x, &ex, &ro, &c, daddr(r), r.size(), &o)
            }
        }
    };
    known(s);
    assert_ne!(s, medley_status::Ok, "a launch without an engine succeeded");
}

/// One MoE call, chosen by the input.
pub(crate) fn fuzz(r: &mut Bytes<'_>) {
    match r.u8() % 8 {
        0 | 1 => grouped(r),
        2 => padded_len(r),
        3 | 4 => align(r),
        5 | 6 => layer(r),
        _ => gpu(r),
    }
}
