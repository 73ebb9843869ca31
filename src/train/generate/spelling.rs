//! A text being spelled out among sorted texts (an object's listed keys, a value's listed
//! values): the range of those it may still become, narrowed a byte at a time.

/// Among sorted texts, those (`lo..hi`) that begin with the `off` bytes read. Sorted, the texts
/// that share a prefix are a range, and one that is exactly the prefix comes first in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Spelling {
    pub(super) lo: u16,
    pub(super) hi: u16,
    off: u16,
}

impl Spelling {
    pub(super) const NONE: Self = Self {
        lo: 0,
        hi: 0,
        off: 0,
    };

    pub(super) fn all(texts: &[String]) -> Self {
        Self {
            lo: 0,
            hi: texts.len() as u16,
            off: 0,
        }
    }

    pub(super) fn is_open(self) -> bool {
        self.lo < self.hi
    }

    /// Those that go on with `b`, if any.
    pub(super) fn narrow(self, texts: &[String], b: u8) -> Option<Self> {
        let off = self.off as usize;
        let range = &texts[self.lo as usize..self.hi as usize];
        // In the range the byte at `off` never decreases, a text that ends there (`None`) first,
        // so the texts going on with `b` are found by bisection.
        let byte = |t: &String| t.as_bytes().get(off).copied();
        let lo = range.partition_point(|t| byte(t) < Some(b));
        let hi = range.partition_point(|t| byte(t) <= Some(b));
        (lo < hi).then(|| Self {
            lo: self.lo + lo as u16,
            hi: self.lo + hi as u16,
            off: self.off + 1,
        })
    }

    /// Whether the bytes read are one of the texts, whole.
    pub(super) fn is_whole(self, texts: &[String]) -> bool {
        self.is_open() && texts[self.lo as usize].len() == self.off as usize
    }
}
