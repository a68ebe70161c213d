//! Matrix products over weights kept in their stored GGUF form: `y = x Wᵀ` where `W` is a
//! `[rows, cols]` matrix of f32, f16, bf16, Q8_0, Q4_0, Q4_K or Q6_K blocks and `x` is `m` rows
//! of f32 activations.
//!
//! * Weights are never widened: each kernel reads the blocks as stored (no second copy in
//!   memory, and the fewest bytes read per token, which is what decode speed is bound by).
//! * Activations are quantised to 8 bits once per product for the quantized types, so the inner
//!   loops are integer dot products (SIMD on x86-64 with AVX2/FMA/F16C and on AArch64 with
//!   NEON; a portable path elsewhere).
//! * Rows of `W` are split between the threads of rayon's global pool; for a prompt (`m > 1`)
//!   each weight row is unpacked once for four activation rows at a time, and a thread's block
//!   of weight rows is reused for a tile of activation rows while it is in cache; for a decode
//!   step (`m = 1`) each thread reads its rows as two streams at once.

mod act;
mod attention;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod elementwise;
mod formats;
#[cfg(target_arch = "aarch64")]
mod neon;
mod portable;
mod repack;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use rayon::prelude::*;

pub use attention::{AttnShape, KvElem, attend_causal};
pub use elementwise::silu_mul;
pub use formats::{QType, dequantize_row};

use act::{ActRow, Acts};

/// What can be wrong with a matrix or a product's operands.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    /// The byte length does not match the type and shape.
    #[error("a {ty} matrix of {rows}×{cols} takes {expected} bytes, got {got}")]
    Size {
        /// Storage type.
        ty: QType,
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// The row length is not a whole number of blocks.
    #[error("a {ty} row of {cols} values is not a whole number of {block}-value blocks")]
    Blocks {
        /// Storage type.
        ty: QType,
        /// Columns.
        cols: usize,
        /// Block size.
        block: usize,
    },
    /// The operands of a product do not fit the matrix.
    #[error("operands do not fit a {rows}×{cols} matrix: {what}")]
    Operands {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// What is wrong.
        what: String,
    },
}

/// Which implementation runs the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The fastest this CPU supports.
    Auto,
    /// The SIMD kernels that need no AVX-512: on x86-64 the AVX2/FMA/F16C kernels even where
    /// AVX-512 VNNI ones would run (for comparison and tests); elsewhere the same as `Auto`.
    Avx2,
    /// The portable scalar kernels (for comparison and tests).
    Portable,
}

/// The kernels a product runs, from a [`Backend`] and what this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// Scalar loops.
    Portable,
    /// AVX2/FMA/F16C on x86-64, NEON on AArch64.
    Simd,
    /// `Simd`, with AVX-512 VNNI kernels for the interleaved integer groups (x86-64).
    Avx512,
}

impl Isa {
    fn of(backend: Backend) -> Isa {
        if backend == Backend::Portable || !simd_available() {
            Isa::Portable
        } else if backend == Backend::Auto && avx512_available() {
            Isa::Avx512
        } else {
            Isa::Simd
        }
    }

    fn simd(self) -> bool {
        self != Isa::Portable
    }
}

/// `LLMESH_KERNELS`: `portable` or `avx2` holds every product of this process to those kernels
/// (to compare them in a whole model).
fn kernels_env_is(v: &str) -> bool {
    std::env::var("LLMESH_KERNELS").is_ok_and(|e| e == v)
}

fn simd_available() -> bool {
    static SIMD: OnceLock<bool> = OnceLock::new();
    *SIMD.get_or_init(|| {
        if kernels_env_is("portable") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            x86::available()
        }
        // NEON is part of every AArch64 CPU.
        #[cfg(target_arch = "aarch64")]
        {
            true
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            false
        }
    })
}

/// Whether the AVX-512 VNNI kernels run here.
fn avx512_available() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            simd_available() && !kernels_env_is("avx2") && avx512::available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// f16 values (their bits) widened into `dst` (as long): whole runs of eight with the CPU's
/// conversion instructions where it has them, the rest one by one.
fn widen_halves(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    let done = if widen_runs_of_eight(src, dst) {
        n / 8 * 8
    } else {
        0
    };
    for (s, d) in src[done..].iter().zip(&mut dst[done..]) {
        *d = half::f16::from_bits(*s).to_f32();
    }
}

/// Widens the whole runs of eight of `src` into `dst` where the CPU has a SIMD conversion;
/// whether it did.
fn widen_runs_of_eight(src: &[u16], dst: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: simd_available() confirmed AVX2, FMA and F16C.
        unsafe { x86::widen_halves(src, dst) };
        return true;
    }
    #[cfg(target_arch = "aarch64")]
    {
        // SAFETY: NEON is part of every AArch64 CPU.
        unsafe { neon::widen_halves(src, dst) };
        true
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        let _ = (src, dst);
        false
    }
}

/// The output's base pointer, shared by the tasks of one product.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: tasks write through it only into the disjoint column ranges given to `Out::new`.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// One task's window of a product's output: columns `cols` of each of `m` rows of `n` values.
struct Out<'a> {
    base: *mut f32,
    m: usize,
    n: usize,
    cols: std::ops::Range<usize>,
    _y: std::marker::PhantomData<&'a mut [f32]>,
}

impl Out<'_> {
    /// # Safety
    /// `y` points to `m * n` values that outlive the window, and no other live window or
    /// reference covers columns `cols` of those rows.
    unsafe fn new(y: OutPtr, m: usize, n: usize, cols: std::ops::Range<usize>) -> Self {
        assert!(cols.end <= n, "output columns out of range");
        Out {
            base: y.0,
            m,
            n,
            cols,
            _y: std::marker::PhantomData,
        }
    }

    /// The window's part of output row `i`.
    fn row(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.m, "output row out of range");
        // SAFETY: row i's columns `cols` lie within the m × n output and belong to this window
        // alone (Out::new's contract); `&mut self` keeps the slice unique within it.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.add(i * self.n + self.cols.start),
                self.cols.len(),
            )
        }
    }
}

/// `ys[i] = x Wᵢᵀ` for every matrix of `ws` (all `cols` wide) in one parallel loop over all
/// their rows.
fn products(
    backend: Backend,
    ws: &[&QMatrix],
    x: &[f32],
    m: usize,
    ys: &mut [&mut [f32]],
) -> Result<(), KernelError> {
    if ws.len() != ys.len() {
        return Err(KernelError::Operands {
            rows: ws.first().map_or(0, |w| w.rows),
            cols: ws.first().map_or(0, |w| w.cols),
            what: format!("{} matrices but {} outputs", ws.len(), ys.len()),
        });
    }
    for (w, y) in ws.iter().zip(ys.iter()) {
        w.check_operands(x, m, y)?;
    }
    let Some(k) = ws.first().map(|w| w.cols) else {
        return Ok(());
    };
    if m == 0 {
        return Ok(());
    }
    let isa = Isa::of(backend);
    // One quantised copy of `x` per weight type (a layer's q, k and v usually share one).
    let mut acts: Vec<(QType, Acts<'_>)> = Vec::new();
    let act_of: Vec<usize> = ws
        .iter()
        .map(|w| match acts.iter().position(|(ty, _)| *ty == w.ty) {
            Some(i) => i,
            None => {
                acts.push((w.ty, Acts::new(w.ty, x, k, isa.simd())));
                acts.len() - 1
            }
        })
        .collect();
    let chunk = task_rows(ws.iter().map(|w| w.rows).sum(), m);
    let tasks: Vec<(usize, std::ops::Range<usize>)> = ws
        .iter()
        .enumerate()
        .flat_map(|(i, w)| {
            (0..w.rows.div_ceil(chunk)).map(move |t| (i, t * chunk..((t + 1) * chunk).min(w.rows)))
        })
        .collect();
    let ptrs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    tasks.into_par_iter().for_each(|(i, rows)| {
        let w = ws[i];
        // SAFETY: `ys[i]` holds m rows of w.rows values; this task writes only columns `rows`
        // of each, no two tasks of matrix i share a column, and `ys` outlives the loop.
        let mut out = unsafe { Out::new(ptrs[i], m, w.rows, rows.clone()) };
        w.tile(isa, &acts[act_of[i]].1, m, rows, &mut out);
    });
    Ok(())
}

/// Streams a decode step's product reads at once (see [`QMatrix::decode_groups`]).
#[cfg(target_arch = "x86_64")]
const DECODE_STREAMS: usize = 2;

/// Bytes of each interleaved group read per turn of a decode step's streams (rounded down to
/// whole block columns, at least one). Measured on Q4_0, Q4_K and Q8_0: 256 bytes spends too
/// much on each turn's setup, and 2,048 (1,024 on Q4_0) gains less from the second stream.
#[cfg(target_arch = "x86_64")]
const DECODE_CHUNK_BYTES: usize = 512;

/// Rows per task of a product over `n` weight rows and `m` activation rows: enough tasks to
/// balance uneven cores, each a whole number of 16-row panels (8-row groups for a mat-vec). A
/// prompt's product is bound by arithmetic, so the thread that finishes first idles for up to a
/// task's time: it gets four times as many tasks as a mat-vec, which streams its rows and gains
/// nothing from shorter tasks.
fn task_rows(n: usize, m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let (tasks, unit) = if m > 1 { (16, 16) } else { (4, 8) };
    n.div_ceil(threads * tasks).div_ceil(unit).max(1) * unit
}

/// Columns of a half-precision panel widened at a time (16 rows × 2048 f32: 128 KiB, in L2).
#[cfg(target_arch = "x86_64")]
const PANEL_COLS: usize = 2048;

/// A widened 16-row panel (columns `k0..`) against the packed tile of activation rows starting
/// at row `i` (`M` rows), added into columns `at..at + 16` of `out` (stored for the first
/// columns); `ahead` is fetched into the cache meanwhile.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn panel_pass<const M: usize>(
    panel: &[f32],
    acts: &Acts<'_>,
    i: usize,
    k0: usize,
    out: &mut Out<'_>,
    at: usize,
    ahead: [&[u8]; 2],
) {
    let (kl, k) = (panel.len() / 16, acts.k);
    let xp = &acts.packed[i * k + M * k0..][..M * kl];
    // SAFETY: packed activations exist only when x86::available() holds; the tile holds `kl`
    // columns of `M` values from column k0.
    let r = unsafe { x86::panel16::<M>(panel, xp, ahead) };
    for (d, part) in r.iter().enumerate() {
        let o = &mut out.row(i + d)[at..at + 16];
        if k0 == 0 {
            o.copy_from_slice(part);
        } else {
            for (o, v) in o.iter_mut().zip(part) {
                *o += v;
            }
        }
    }
}

/// A weight matrix `[rows, cols]` in its stored form.
///
/// On CPUs with a SIMD path, quantized and half-precision rows are reordered in groups of eight (see
/// `repack`); the byte count never changes.
#[derive(Clone)]
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// Rows `0..grouped` are stored in interleaved groups of eight; the rest as in the file.
    grouped: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({} {}×{})", self.ty, self.rows, self.cols)
    }
}

impl QMatrix {
    /// Takes `data` as `rows` rows of `cols` values stored as `ty` (the file's layout).
    pub fn new(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, KernelError> {
        let block = ty.block_elems();
        if !cols.is_multiple_of(block) {
            return Err(KernelError::Blocks { ty, cols, block });
        }
        let row_bytes = ty.row_bytes(cols);
        let expected = row_bytes * rows;
        if data.len() != expected {
            return Err(KernelError::Size {
                ty,
                rows,
                cols,
                expected,
                got: data.len(),
            });
        }
        let mut m = QMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            grouped: 0,
            data,
        };
        if cfg!(target_arch = "x86_64") && simd_available() && repack::interleaves(ty) {
            m.interleave();
        }
        Ok(m)
    }

    /// Reorders whole groups of eight rows in place (one group of scratch space).
    fn interleave(&mut self) {
        let gb = 8 * self.row_bytes;
        let groups = self.rows / 8;
        let mut scratch = vec![0u8; gb];
        for g in 0..groups {
            let src = &mut self.data[g * gb..(g + 1) * gb];
            repack::pack8(self.ty, src, self.row_bytes, &mut scratch);
            src.copy_from_slice(&scratch);
        }
        self.grouped = groups * 8;
    }

    /// The storage type.
    pub fn qtype(&self) -> QType {
        self.ty
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    /// The stored bytes of row `r` in the file's layout.
    pub fn row(&self, r: usize) -> std::borrow::Cow<'_, [u8]> {
        if r < self.grouped {
            let g = r / 8;
            std::borrow::Cow::Owned(repack::unpack_row(
                self.ty,
                self.group(g),
                self.row_bytes,
                r % 8,
            ))
        } else {
            std::borrow::Cow::Borrowed(self.plain_row(r))
        }
    }

    fn plain_row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    fn group(&self, g: usize) -> &[u8] {
        let gb = 8 * self.row_bytes;
        &self.data[g * gb..(g + 1) * gb]
    }

    /// Row `r` widened to f32 into `out` (`cols` long).
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.ty, &self.row(r), &mut out[..self.cols]);
    }

    /// The whole matrix widened to f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row_into(r, o);
        }
        out
    }

    /// `y = x Wᵀ` for `m` rows of `x` (`m × cols`, row-major) into `y` (`m × rows`).
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_with(Backend::Auto, x, m, y)
    }

    /// [`QMatrix::matmul`] on a chosen backend.
    pub fn matmul_with(
        &self,
        backend: Backend,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        products(backend, &[self], x, m, &mut [y])
    }

    /// `ys[i] = x Wᵢᵀ` for matrices `ws` that share their input (a layer's query, key and value
    /// projections; its gate and up projections): `x` is quantised once per weight type and
    /// the rows of all the matrices are shared among the threads in one parallel loop, instead
    /// of one loop (and one wake-up of the pool) per matrix.
    pub fn matmul_many(
        ws: &[&QMatrix],
        x: &[f32],
        m: usize,
        ys: &mut [&mut [f32]],
    ) -> Result<(), KernelError> {
        products(Backend::Auto, ws, x, m, ys)
    }

    fn check_operands(&self, x: &[f32], m: usize, y: &[f32]) -> Result<(), KernelError> {
        let (n, k) = (self.rows, self.cols);
        if x.len() != m * k || y.len() != m * n {
            return Err(KernelError::Operands {
                rows: n,
                cols: k,
                what: format!(
                    "{} inputs and {} outputs for {m} rows (want {} and {})",
                    x.len(),
                    y.len(),
                    m * k,
                    m * n
                ),
            });
        }
        Ok(())
    }

    /// Weight rows `rows` (starting on a multiple of 8) against all `m` activation rows, into
    /// `out` (`m × rows.len()`).
    fn tile(
        &self,
        isa: Isa,
        acts: &Acts<'_>,
        m: usize,
        rows: std::ops::Range<usize>,
        out: &mut Out<'_>,
    ) {
        // Half-precision prompts: whole 16-row panels first, the rest below.
        #[cfg(target_arch = "x86_64")]
        let first = self.half_panels(acts, m, &rows, out);
        #[cfg(not(target_arch = "x86_64"))]
        let first = rows.start;
        let simd = isa.simd();
        // A mat-vec's interleaved groups: two streams at once.
        #[cfg(target_arch = "x86_64")]
        let first = if m == 1 && simd && first < self.grouped {
            self.decode_groups(
                isa,
                acts.row(0),
                first / 8..self.grouped.min(rows.end) / 8,
                rows.start,
                out,
            )
        } else {
            first
        };
        // Activation rows per pass: their 8-bit copies stay in the L2 cache while the thread's
        // weight rows stream past them.
        const MT: usize = 32;
        for i0 in (0..m).step_by(MT) {
            let i1 = (i0 + MT).min(m);
            let mut j = first;
            while j < rows.end {
                let jj = j - rows.start;
                if j < self.grouped && simd {
                    // Float groups take 8 activation rows per tile (enough independent
                    // multiply-adds to hide their latency), integer groups 4.
                    if matches!(self.ty, QType::F32 | QType::F16 | QType::BF16) {
                        self.group_tile::<8>(isa, j / 8, acts, i0..i1, out, jj);
                    } else {
                        self.group_tile::<4>(isa, j / 8, acts, i0..i1, out, jj);
                    }
                    j += 8;
                    continue;
                }
                let w = self.row(j);
                let mut i = i0;
                while i + 4 <= i1 {
                    let r = self.dots::<4>(
                        simd,
                        &w,
                        [
                            acts.row(i),
                            acts.row(i + 1),
                            acts.row(i + 2),
                            acts.row(i + 3),
                        ],
                    );
                    for (d, v) in r.into_iter().enumerate() {
                        out.row(i + d)[jj] = v;
                    }
                    i += 4;
                }
                while i < i1 {
                    out.row(i)[jj] = self.dots::<1>(simd, &w, [acts.row(i)])[0];
                    i += 1;
                }
                j += 1;
            }
        }
    }

    /// The whole interleaved 16-row panels at the start of `rows` (where `out`'s window
    /// starts) against all `m` packed activation rows, if the activations are packed (a
    /// half-precision prompt); returns the first row left for the other paths. A panel is
    /// widened to f32 for [`PANEL_COLS`] columns at a time (once per product, not once per
    /// activation row) and then used for every tile of activation rows.
    #[cfg(target_arch = "x86_64")]
    fn half_panels(
        &self,
        acts: &Acts<'_>,
        m: usize,
        rows: &std::ops::Range<usize>,
        out: &mut Out<'_>,
    ) -> usize {
        let panels = self.grouped.min(rows.end).saturating_sub(rows.start) / 16;
        if acts.packed.is_empty() || panels == 0 {
            return rows.start;
        }
        let end = rows.start + 16 * panels;
        let k = self.cols;
        let tiles = act::pack_tiles(m);
        let mut buf = vec![0f32; 16 * PANEL_COLS.min(k)];
        // Each panel's half-precision columns, in the order they are widened.
        let steps: Vec<(usize, usize)> = (0..k)
            .step_by(PANEL_COLS)
            .flat_map(|k0| (rows.start..end).step_by(16).map(move |j| (k0, j)))
            .collect();
        let columns = |(k0, j): (usize, usize)| {
            let bytes = 16 * k0..16 * (k0 + PANEL_COLS.min(k - k0));
            [
                &self.group(j / 8)[bytes.clone()],
                &self.group(j / 8 + 1)[bytes],
            ]
        };
        for (s, &(k0, j)) in steps.iter().enumerate() {
            let kl = PANEL_COLS.min(k - k0);
            let panel = &mut buf[..16 * kl];
            let [g0, g1] = columns((k0, j));
            // SAFETY: groups exist only when x86::available() holds; `columns` gives whole
            // columns of both groups.
            unsafe {
                if self.ty == QType::BF16 {
                    x86::widen_pair::<true>(g0, g1, panel);
                } else {
                    x86::widen_pair::<false>(g0, g1, panel);
                }
            }
            // The next panel's weights are fetched from memory while this one computes, a
            // share per tile, so widening it does not wait for them.
            let next = steps.get(s + 1).map(|&step| columns(step));
            let at = j - rows.start;
            for (t, &(i, len)) in tiles.iter().enumerate() {
                // This tile's share of the next panel's weights (of each of its two groups).
                let share = |g: usize| -> &[u8] {
                    let Some(next) = next else { return &[] };
                    let part = next[g].len().div_ceil(tiles.len());
                    let end = ((t + 1) * part).min(next[g].len());
                    next[g].get(t * part..end).unwrap_or_default()
                };
                let ahead = [share(0), share(1)];
                match len {
                    6.. => panel_pass::<6>(panel, acts, i, k0, out, at, ahead),
                    5 => panel_pass::<5>(panel, acts, i, k0, out, at, ahead),
                    4 => panel_pass::<4>(panel, acts, i, k0, out, at, ahead),
                    3 => panel_pass::<3>(panel, acts, i, k0, out, at, ahead),
                    2 => panel_pass::<2>(panel, acts, i, k0, out, at, ahead),
                    _ => panel_pass::<1>(panel, acts, i, k0, out, at, ahead),
                }
            }
        }
        end
    }

    /// Group `g` against activation rows `is`, `T` rows per tile and one at a time for the
    /// rest, into columns `at..at + 8` of `out`.
    fn group_tile<const T: usize>(
        &self,
        isa: Isa,
        g: usize,
        acts: &Acts<'_>,
        is: std::ops::Range<usize>,
        out: &mut Out<'_>,
        at: usize,
    ) {
        let mut i = is.start;
        while i + T <= is.end {
            let r = self.group_dots::<T>(isa, g, std::array::from_fn(|a| acts.row(i + a)));
            for (d, lanes) in r.iter().enumerate() {
                out.row(i + d)[at..at + 8].copy_from_slice(lanes);
            }
            i += T;
        }
        while i < is.end {
            let [lanes] = self.group_dots::<1>(isa, g, [acts.row(i)]);
            out.row(i)[at..at + 8].copy_from_slice(&lanes);
            i += 1;
        }
    }

    /// Interleaved groups `groups` against one activation row (a decode step's product), into
    /// `out`, whose window starts at row `first_row`; returns the first row after them.
    ///
    /// The groups are read as [`DECODE_STREAMS`] streams far apart in memory (the first and the
    /// second half of the range), a few hundred bytes of each in turn. A core keeps more reads
    /// in flight for two streams than for one: on a 2-core Zen 3 VM a layer's mat-vecs read
    /// more bytes per second this way: Q4_0 7–13%, Q8_0 12%, Q4_K 1–7%, F16 the same
    /// (alternating runs; the machine was noisy). Every group's columns are summed in
    /// the same chunks whichever stream it is in, so a row's result does not depend on how rows
    /// were split into tasks.
    #[cfg(target_arch = "x86_64")]
    fn decode_groups(
        &self,
        isa: Isa,
        x: ActRow<'_>,
        groups: std::ops::Range<usize>,
        first_row: usize,
        out: &mut Out<'_>,
    ) -> usize {
        let half = groups.len().div_ceil(DECODE_STREAMS);
        let chunk = (DECODE_CHUNK_BYTES / (8 * self.ty.block_bytes())).max(1);
        for t in 0..half {
            // Group t of each stream; the last stream may have run out.
            let gs: [usize; DECODE_STREAMS] = std::array::from_fn(|s| groups.start + t + s * half);
            let live = gs.iter().take_while(|&&g| g < groups.end).count();
            let gs_bytes = gs.map(|g| self.group(g.min(groups.end - 1)));
            // SAFETY: groups exist only when x86::available() holds, and Isa::Avx512 only where
            // avx512::available() does; each group is whole block columns of this type, as long
            // as the activation row.
            let acc = unsafe {
                if isa == Isa::Avx512 {
                    avx512::in_turn::<DECODE_STREAMS>(self.ty, gs_bytes, live, x, chunk)
                } else {
                    x86::in_turn::<DECODE_STREAMS>(self.ty, gs_bytes, live, x, chunk)
                }
            };
            for (a, &g) in acc.iter().zip(&gs[..live]) {
                let at = 8 * g - first_row;
                out.row(0)[at..at + 8].copy_from_slice(a);
            }
        }
        8 * groups.end
    }

    /// An interleaved group of eight rows against `M` activation rows (SIMD only).
    #[inline]
    fn group_dots<const M: usize>(&self, isa: Isa, g: usize, xs: [ActRow<'_>; M]) -> [[f32; 8]; M] {
        let group = self.group(g);
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: groups exist only when x86::available() confirmed the CPU features, and
            // Isa::Avx512 only where avx512::available() did; the group and activation lengths
            // match the matrix shape.
            unsafe {
                if isa == Isa::Avx512 {
                    avx512::group_dots(self.ty, group, xs)
                } else {
                    x86::group_dots(self.ty, group, xs)
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, group, xs);
            unreachable!("rows are interleaved only where a SIMD kernel reads them")
        }
    }

    /// One weight row (file layout) against `M` activation rows.
    #[inline]
    fn dots<const M: usize>(&self, simd: bool, w: &[u8], xs: [ActRow<'_>; M]) -> [f32; M] {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is only true when x86::available() confirmed the CPU features;
            // the row and activation lengths match the matrix shape (checked in matmul_with).
            return unsafe {
                match self.ty {
                    QType::Q8_0 => x86::q_32::<M, false>(w, xs),
                    QType::Q4_0 => x86::q_32::<M, true>(w, xs),
                    QType::Q4K => x86::q4k::<M>(w, xs),
                    QType::Q6K => x86::q6k::<M>(w, xs),
                    QType::F32 => x86::float::<M>(x86::Float::F32, w, xs),
                    QType::F16 => x86::float::<M>(x86::Float::F16, w, xs),
                    QType::BF16 => x86::float::<M>(x86::Float::BF16, w, xs),
                }
            };
        }
        #[cfg(target_arch = "aarch64")]
        if simd {
            return neon::dots::<M>(self.ty, w, xs);
        }
        let _ = simd;
        xs.map(|x| portable::dot(self.ty, w, x))
    }
}

#[cfg(test)]
mod tests {
    /// Every f16 bit pattern widens as the format says (NaNs stay NaN), in runs of any length.
    #[test]
    fn halves_widen_exactly() {
        let src: Vec<u16> = (0..=u16::MAX).collect();
        for len in [src.len(), 13] {
            let mut dst = vec![0f32; len];
            super::widen_halves(&src[..len], &mut dst);
            for (&b, &v) in src.iter().zip(&dst) {
                let want = half::f16::from_bits(b).to_f32();
                assert!(
                    v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                    "{b:#06x}"
                );
            }
        }
    }
}
