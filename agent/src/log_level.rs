//! The agent's log filter (`RUST_LOG` syntax), changeable while it runs
//! through the control API (`tollgatectl log-level`).

use std::sync::{Arc, Mutex};

use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt, reload};

#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("invalid log filter {filter:?}: {reason}")]
    Invalid { filter: String, reason: String },
    #[error("the log subscriber is gone")]
    Gone,
}

/// A handle on the installed filter; clones share it.
#[derive(Clone)]
pub struct LogLevel {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter as given, for reading back.
    current: Arc<Mutex<String>>,
}

fn parse(filter: &str) -> Result<EnvFilter, LogLevelError> {
    EnvFilter::try_new(filter).map_err(|e| LogLevelError::Invalid {
        filter: filter.to_owned(),
        reason: e.to_string(),
    })
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LogLevel").field(&self.get()).finish()
    }
}

impl LogLevel {
    /// The process's subscriber: `layer` (the output) under a reloadable
    /// filter. Call once, before anything logs.
    pub fn install<L>(filter: &str, layer: L) -> Result<Self, LogLevelError>
    where
        L: tracing_subscriber::Layer<
                tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>,
            > + Send
            + Sync
            + 'static,
    {
        let (filter_layer, handle) = reload::Layer::new(parse(filter)?);
        let subscriber = Registry::default().with(filter_layer).with(layer);
        tracing::subscriber::set_global_default(subscriber)
            .expect("the log subscriber is installed once, first thing");
        Ok(Self {
            handle,
            current: Arc::new(Mutex::new(filter.to_owned())),
        })
    }

    pub fn get(&self) -> String {
        self.current.lock().expect("not poisoned").clone()
    }

    /// Replaces the filter; an invalid one changes nothing.
    pub fn set(&self, filter: &str) -> Result<(), LogLevelError> {
        let parsed = parse(filter)?;
        let mut current = self.current.lock().expect("not poisoned");
        self.handle
            .reload(parsed)
            .map_err(|_| LogLevelError::Gone)?;
        *current = filter.to_owned();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_filters_are_refused_with_the_reason() {
        let error = parse("tollgate=loud").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("invalid log filter \"tollgate=loud\": "),
            "{error}"
        );
        assert!(parse("info,tollgate_agent=debug").is_ok());
    }
}
