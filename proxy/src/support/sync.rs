//! Locks that outlive a panicking holder.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the data even if a holder panicked: every structure the edge
/// guards this way stays consistent between statements, and a panic in one connection's
/// task must not take the whole edge down with it.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
