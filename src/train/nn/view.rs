//! Raw strided views of matrices, a product's destination and a thread-crossing output pointer:
//! the operand types every direct gemm call in this directory passes around.

/// A strided matrix: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct View<T> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> View<T> {
    /// `s` as the row-major (rows, cols) matrix it is.
    pub fn rows(s: &[T], cols: usize) -> Self {
        View {
            ptr: s.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose (cols, rows) of the row-major (rows, cols) matrix `s`, without a copy.
    pub fn t(s: &[T], cols: usize) -> Self {
        View {
            ptr: s.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }

    /// This view's transpose.
    pub fn transposed(self) -> Self {
        View {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// Where a product goes: rows at stride `rs`, columns contiguous; overwritten, or added to when
/// `accumulate`.
#[derive(Clone, Copy)]
pub(crate) struct Dst<T> {
    pub ptr: *mut T,
    pub rs: usize,
    pub accumulate: bool,
}

impl<T> Dst<T> {
    /// A destination to overwrite (it may be uninitialized).
    pub fn fresh(ptr: *mut T, rs: usize) -> Self {
        Dst {
            ptr,
            rs,
            accumulate: false,
        }
    }

    /// A destination to add to (it must be initialized).
    pub fn add_to(ptr: *mut T, rs: usize) -> Self {
        Dst {
            ptr,
            rs,
            accumulate: true,
        }
    }
}

/// A raw pointer that may cross threads: the fused kernels hand disjoint blocks of one output
/// buffer to different threads.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: only used for writes to disjoint regions, joined before the buffer is read.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `SendPtr`, not its field).
    pub fn get(&self) -> *mut T {
        self.0
    }
}
