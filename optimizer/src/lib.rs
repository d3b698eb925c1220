//! The WAN-optimization data plane (being built: issue 3).
