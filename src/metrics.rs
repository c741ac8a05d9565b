//! Prometheus metrics on a registry the program owns (no global default registry).
//!
//! Each component registers its own families ([`crate::proxy::metrics`],
//! [`crate::cache::metrics`], [`crate::fetch::metrics`], [`crate::shield::metrics`],
//! [`crate::fleet::metrics`]); this module holds what they share: typed families whose label
//! values are enums ([`labels`]), never strings chosen at the call site or taken from input, so
//! cardinality is bounded and a help text lists exactly the values the code can set.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub(crate) mod labels;

pub(crate) use labels::Label;

/// Buckets for request and upstream latencies, in seconds.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Registers `c` and hands it back (for the struct being built).
pub(crate) fn register<C: Collector + Clone + 'static>(
    r: &Registry,
    c: C,
) -> prometheus::Result<C> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

/// `help` followed by the values each label takes, so help texts cannot drift from the code.
fn help_with<L: Label>(help: &str, name: &str) -> String {
    format!(
        "{help} ({name}: {}).",
        L::ALL
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A counter family with one label of type `L`.
///
/// Every series is created at registration and its handle kept, indexed by [`Label::index`]:
/// counting is one atomic add, with no label hashing or map lookup (prometheus's
/// `with_label_values` hashes the label strings and takes a read lock each time, several times
/// per request on the query path).
#[derive(Debug, Clone)]
pub(crate) struct Counter1<L: Label> {
    series: std::sync::Arc<[IntCounter]>,
    _label: std::marker::PhantomData<L>,
}

impl<L: Label> Counter1<L> {
    pub(crate) fn register(r: &Registry, name: &str, help: &str) -> prometheus::Result<Self> {
        let vec = IntCounterVec::new(Opts::new(name, help_with::<L>(help, L::NAME)), &[L::NAME])?;
        // Every series exists from the start, at 0, so rates work from the first scrape.
        let series = L::ALL
            .iter()
            .map(|l| vec.with_label_values(&[l.as_str()]))
            .collect();
        register(r, vec)?;
        Ok(Counter1 {
            series,
            _label: std::marker::PhantomData,
        })
    }
    pub(crate) fn inc(&self, l: L) {
        self.series[l.index()].inc();
    }
    pub(crate) fn inc_by(&self, l: L, n: u64) {
        if n > 0 {
            self.series[l.index()].inc_by(n);
        }
    }
    #[cfg(test)]
    pub(crate) fn get(&self, l: L) -> u64 {
        self.series[l.index()].get()
    }
}

/// A counter family with two labels (series kept as [`Counter1`]'s, at
/// `a.index() * B::ALL.len() + b.index()`).
#[derive(Debug, Clone)]
pub(crate) struct Counter2<A: Label, B: Label> {
    series: std::sync::Arc<[IntCounter]>,
    _labels: std::marker::PhantomData<(A, B)>,
}

impl<A: Label, B: Label> Counter2<A, B> {
    pub(crate) fn register(r: &Registry, name: &str, help: &str) -> prometheus::Result<Self> {
        let help = format!(
            "{} ({}: {}; {}: {}).",
            help,
            A::NAME,
            A::ALL
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            B::NAME,
            B::ALL
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let vec = IntCounterVec::new(Opts::new(name, help), &[A::NAME, B::NAME])?;
        let series = A::ALL
            .iter()
            .flat_map(|a| B::ALL.iter().map(move |b| (a, b)))
            .map(|(a, b)| vec.with_label_values(&[a.as_str(), b.as_str()]))
            .collect();
        register(r, vec)?;
        Ok(Counter2 {
            series,
            _labels: std::marker::PhantomData,
        })
    }
    pub(crate) fn inc(&self, a: A, b: B) {
        self.inc_by(a, b, 1);
    }
    pub(crate) fn inc_by(&self, a: A, b: B, n: u64) {
        if n > 0 {
            self.series[a.index() * B::ALL.len() + b.index()].inc_by(n);
        }
    }
}

/// A histogram family with one label (series kept as [`Counter1`]'s).
#[derive(Debug, Clone)]
pub(crate) struct Histogram1<L: Label> {
    series: std::sync::Arc<[Histogram]>,
    _label: std::marker::PhantomData<L>,
}

impl<L: Label> Histogram1<L> {
    pub(crate) fn register(
        r: &Registry,
        name: &str,
        help: &str,
        buckets: &[f64],
    ) -> prometheus::Result<Self> {
        let opts =
            HistogramOpts::new(name, help_with::<L>(help, L::NAME)).buckets(buckets.to_vec());
        let vec = HistogramVec::new(opts, &[L::NAME])?;
        let series = L::ALL
            .iter()
            .map(|l| vec.with_label_values(&[l.as_str()]))
            .collect();
        register(r, vec)?;
        Ok(Histogram1 {
            series,
            _label: std::marker::PhantomData,
        })
    }
    pub(crate) fn observe(&self, l: L, v: f64) {
        self.series[l.index()].observe(v);
    }
}

/// `tpns_cache_build_info{version}`: always 1.
pub(crate) fn register_build_info(r: &Registry) -> prometheus::Result<()> {
    let g = IntGaugeVec::new(
        Opts::new("tpns_cache_build_info", "Always 1; labels name the build."),
        &["version"],
    )?;
    g.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    r.register(Box::new(g))
}

/// The text exposition of everything in `registry`.
pub(crate) fn encode(registry: &Registry) -> Vec<u8> {
    let mut buf = Vec::new();
    // Encoding into a Vec only fails on invalid metric families, which `register` rejects.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    buf
}
