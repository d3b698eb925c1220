//! The pingora sticky-session proxy (being built: issue 5).
