//! Versioned structs: every params/info struct starts with `uint32_t struct_size`, so fields
//! can be appended without breaking callers compiled against an older header.

use crate::error::{Error, Result};

/// A struct that crosses the ABI with a leading `struct_size`. `SIZES` lists the sizes of
/// every released version, oldest first (append when a version adds fields). Only those sizes,
/// or larger ones from newer headers, are accepted, so a copy never ends inside a field.
pub trait Versioned: Copy {
    const SIZES: &'static [usize];
}

/// The largest released size of `T` that `struct_size` covers, or an error naming `name`.
fn usable_size<T: Versioned>(struct_size: u32, name: &'static str, field: &str) -> Result<usize> {
    let size = struct_size as usize;
    let newest = std::mem::size_of::<T>();
    if size >= newest && size <= MAX_STRUCT_SIZE as usize {
        return Ok(newest);
    }
    T::SIZES
        .iter()
        .rev()
        .copied()
        .find(|&s| s == size)
        .ok_or_else(|| {
            Error::invalid_arg(
                name,
                format!(
                    "{field} is {size}, which is not the size of any version of this struct \
                     ({:?}); set it from the _default() function or sizeof",
                    T::SIZES
                ),
            )
        })
}

/// Largest `struct_size` accepted; anything bigger is surely garbage, not a newer header.
const MAX_STRUCT_SIZE: u32 = 1 << 16;

/// Reads a caller's params struct: NULL means `default`; otherwise the first
/// `min(struct_size, size_of::<T>())` bytes come from the caller and the rest keep
/// `default`'s values (fields an older caller did not know about).
///
/// # Safety
/// `p` must be NULL or point to at least `struct_size` readable bytes, starting with a u32.
/// `T` must be `repr(C)`, start with a `u32` size field, and every bit pattern of its
/// fields must be valid (integers, raw pointers, `Option<fn>`).
pub unsafe fn read_params<T: Versioned>(p: *const T, default: T, name: &'static str) -> Result<T> {
    if p.is_null() {
        return Ok(default);
    }
    // SAFETY: non-null; the caller's struct begins with its u32 size.
    let size = unsafe { (p as *const u32).read_unaligned() };
    let n = usable_size::<T>(size, name, "struct_size")?;
    let mut out = default;
    // SAFETY: n bytes are readable from p (its struct_size) and writable in out (size_of T).
    unsafe {
        std::ptr::copy_nonoverlapping(p as *const u8, &mut out as *mut T as *mut u8, n);
    }
    Ok(out)
}

/// Writes an info struct into the caller's, copying only the `struct_size` bytes the caller
/// has room for (its `struct_size` field, set by the caller, is kept).
///
/// # Safety
/// `out` must be non-NULL and point to at least its `struct_size` writable bytes.
pub unsafe fn write_out_struct<T: Versioned>(
    out: *mut T,
    value: &T,
    name: &'static str,
) -> Result<()> {
    // SAFETY: the caller set struct_size in the first u32.
    let size = unsafe { (out as *const u32).read_unaligned() };
    let n = usable_size::<T>(size, name, "struct_size")?;
    // SAFETY: the caller owns at least `size` bytes; we skip the size field itself.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (value as *const T as *const u8).add(4),
            (out as *mut u8).add(4),
            n - 4,
        );
    }
    Ok(())
}

/// The body of every `hdb_<name>_params_init(T *params, size_t size)`: writes `default` into
/// the caller's struct, for hosts that cannot take a struct returned by value (P/Invoke, some
/// FFI generators). Only the caller's `size` bytes are written (its struct may come from an
/// older header, without the newest fields), with `struct_size` set to what was written.
///
/// # Safety
/// `out` must be NULL or point to `size` writable bytes.
pub unsafe fn init_params<T: Versioned>(
    out: *mut T,
    size: usize,
    default: T,
    name: &'static str,
) -> Result<()> {
    if out.is_null() {
        return Err(Error::NullArgument(name));
    }
    let size = u32::try_from(size).unwrap_or(u32::MAX);
    let n = usable_size::<T>(size, "size", "size")?;
    let mut value = default;
    // SAFETY: T starts with its u32 struct_size (the trait's contract).
    unsafe { (&mut value as *mut T as *mut u32).write_unaligned(n as u32) };
    // SAFETY: n <= size bytes are writable at out (caller's contract), n <= size_of T readable.
    unsafe { std::ptr::copy_nonoverlapping(&value as *const T as *const u8, out as *mut u8, n) };
    Ok(())
}
