//! A process-wide free list of f32 buffers.
//!
//! A training step creates and drops the same activation- and gradient-sized tensors every
//! time. Handing those buffers back to the system allocator makes it return them to the OS and
//! fault them in again on the next step (page faults and TLB shootdowns cost about a tenth of a
//! ResNet-20 step on the development machine). Ops take their output buffers from here, and the
//! tape gives them back when a graph or a consumed gradient is dropped. At most
//! [`MAX_POOLED_BYTES`] are kept; [`release`] frees them.

use std::sync::Mutex;

use crate::Tensor;

/// Upper bound of memory kept for reuse.
pub const MAX_POOLED_BYTES: usize = 1 << 30;

/// Buffers smaller than this go straight to the allocator (it handles them well).
const MIN_POOLED_LEN: usize = 1 << 14;

struct Pool {
    free: Vec<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
});

fn lock() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while holding the lock leaves a consistent free list: recover it.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `len` values with unspecified (initialised) contents: callers overwrite it.
pub fn take(len: usize) -> Vec<f32> {
    if len >= MIN_POOLED_LEN {
        let mut pool = lock();
        // Best fit among buffers that are large enough but not wastefully so.
        let best = pool
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len && v.capacity() <= 2 * len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        if let Some(i) = best {
            let mut v = pool.free.swap_remove(i);
            pool.bytes -= v.capacity() * 4;
            drop(pool);
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, 0.0);
            }
            return v;
        }
    }
    vec![0.0; len]
}

/// A buffer of `len` zeros.
pub fn take_zeroed(len: usize) -> Vec<f32> {
    let mut v = take(len);
    v.fill(0.0);
    v
}

/// A copy of `t` (standard layout, same shape) in a pooled buffer: what `t.clone()` does,
/// without faulting fresh pages in on every step.
pub fn copy(t: &Tensor) -> Tensor {
    let mut v = take(t.len());
    match t.as_slice() {
        Some(s) => v.copy_from_slice(s),
        None => v.iter_mut().zip(t.iter()).for_each(|(d, s)| *d = *s),
    }
    Tensor::from_shape_vec(t.raw_dim(), v).expect("same element count")
}

/// Returns a buffer for reuse (dropped if the pool is full or the buffer small).
pub fn give(v: Vec<f32>) {
    let bytes = v.capacity() * 4;
    if v.capacity() < MIN_POOLED_LEN {
        return;
    }
    let mut pool = lock();
    if pool.bytes + bytes <= MAX_POOLED_BYTES {
        pool.bytes += bytes;
        pool.free.push(v);
    }
}

/// Returns a tensor's buffer for reuse.
pub fn recycle(t: Tensor) {
    let (v, _) = t.into_raw_vec_and_offset();
    give(v);
}

/// Frees every pooled buffer.
pub fn release() {
    let mut pool = lock();
    pool.free.clear();
    pool.bytes = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized() {
        let v = take(1 << 16);
        assert_eq!(v.len(), 1 << 16);
        let p = v.as_ptr();
        give(v);
        let w = take((1 << 16) - 5);
        assert_eq!(w.len(), (1 << 16) - 5);
        // Another test may have taken it concurrently; when we got it back, it is the same.
        if w.as_ptr() == p {
            assert!(w.capacity() >= 1 << 16);
        }
        let z = take_zeroed(1 << 15);
        assert!(z.iter().all(|&x| x == 0.0));
        let t =
            Tensor::from_shape_vec(ndarray::IxDyn(&[2, 3]), vec![1., 2., 3., 4., 5., 6.]).unwrap();
        assert_eq!(copy(&t), t);
        assert_eq!(copy(&t.t().to_owned()), t.t());
        give(w);
        give(z);
        release();
    }
}
