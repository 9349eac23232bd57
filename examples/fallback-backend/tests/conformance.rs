//! The whole conformance suite for the example backend: one line (PORTING.md, step 3).

moe_conformance::suite!(fallback, Ok(fallback_backend::FallbackBackend::new()));
