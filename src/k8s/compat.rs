//! Fields whose optionality changes between Kubernetes versions (for example
//! `Deployment::spec` is an `Option` before 1.37 and required from 1.37):
//! code that must build against every `k8s-openapi` version feature goes
//! through [`Spec`].

/// A field holding a `T`, either directly or as an `Option<T>`.
pub(crate) trait Spec<T> {
    /// Wraps `value` in the field's type.
    fn wrap(value: T) -> Self;
    /// The value, if present.
    fn get(&self) -> Option<&T>;
}

impl<T> Spec<T> for T {
    fn wrap(value: T) -> Self {
        value
    }
    fn get(&self) -> Option<&T> {
        Some(self)
    }
}

impl<T> Spec<T> for Option<T> {
    fn wrap(value: T) -> Self {
        Some(value)
    }
    fn get(&self) -> Option<&T> {
        self.as_ref()
    }
}

/// Wraps `value` for a field of type `S`.
pub(crate) fn wrap<S: Spec<T>, T>(value: T) -> S {
    S::wrap(value)
}

/// The value of a field of type `S`, if present.
pub(crate) fn get<S: Spec<T>, T>(field: &S) -> Option<&T> {
    field.get()
}
