//! Abuse limits: rate limits per key and per source address, a stricter budget for failed
//! authentication, and caps on open connections, all with memory that stays bounded while
//! an attacker rotates keys or addresses.
//!
//! Rate limits are `governor` GCRA limiters over [`BoundedStore`], a keyed state store
//! with a fixed capacity: once full, new keys share one overflow budget instead of growing
//! the table. Only authenticated keys reach the per-key limiter, so its keys are bounded by
//! the keys in the store. Addresses are grouped as an IPv4 address or an IPv6 /64 (what
//! one host usually owns). An address whose failed authentications exceed their budget is
//! blocked until the budget refills: its requests are answered 429 before any key lookup.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

use crate::config::{LimitsConfig, RateLimitConfig};

/// A source address as limits see it: an IPv4 address, or the /64 of an IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrKey {
    V4(u32),
    /// The top 64 bits: the /64.
    V6(u64),
}

impl AddrKey {
    pub fn of(ip: IpAddr) -> AddrKey {
        match ip {
            IpAddr::V4(v4) => AddrKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey::V4(u32::from(v4)),
                None => AddrKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// A keyed GCRA state table with at most `capacity` keys; keys arriving when it is full
/// share one overflow state.
pub struct BoundedStore<K> {
    inner: Mutex<BoundedInner<K>>,
    capacity: usize,
}

struct BoundedInner<K> {
    states: HashMap<K, Nanos>,
    overflow: Option<Nanos>,
}

impl<K> BoundedStore<K> {
    fn new(capacity: usize) -> Self {
        BoundedStore {
            inner: Mutex::new(BoundedInner {
                states: HashMap::new(),
                overflow: None,
            }),
            capacity,
        }
    }
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = inner.states.get_mut(key) {
            let (value, next) = f(Some(*state))?;
            *state = next;
            return Ok(value);
        }
        if inner.states.len() >= self.capacity {
            let (value, next) = f(inner.overflow)?;
            inner.overflow = Some(next);
            return Ok(value);
        }
        let (value, next) = f(None)?;
        inner.states.insert(key.clone(), next);
        Ok(value)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.states.retain(|_, tat| *tat > drop_below);
        if inner.overflow.is_some_and(|tat| tat <= drop_below) {
            inner.overflow = None;
        }
    }

    fn shrink_to_fit(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.states.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .states
            .len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Limiter<K> = RateLimiter<K, BoundedStore<K>, DefaultClock, NoOpMiddleware>;

fn limiter<K: Hash + Eq + Clone>(
    per_period: u32,
    period: Duration,
    burst: u32,
    capacity: usize,
) -> Option<Limiter<K>> {
    let per_period = NonZeroU32::new(per_period)?;
    let quota = Quota::with_period(period / per_period.get())?
        .allow_burst(NonZeroU32::new(burst).unwrap_or(per_period));
    Some(RateLimiter::new(
        quota,
        BoundedStore::new(capacity),
        DefaultClock::default(),
    ))
}

/// A request refused by a limit: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited(pub Duration);

impl Limited {
    /// Whole seconds for `Retry-After`, rounded up, at least 1.
    pub fn retry_after_secs(self) -> u64 {
        (self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0)).max(1)
    }
}

/// Every request-rate limit of one relay.
pub struct RateLimits {
    per_key: Option<Limiter<String>>,
    per_address: Option<Limiter<AddrKey>>,
    auth_failures: Option<Limiter<AddrKey>>,
    /// Addresses past their failed-authentication budget, until when.
    blocked: Mutex<HashMap<AddrKey, Instant>>,
    max_tracked: usize,
    clock: DefaultClock,
}

impl RateLimits {
    pub fn new(config: &RateLimitConfig) -> RateLimits {
        let second = Duration::from_secs(1);
        let tracked = config.max_tracked_addresses;
        RateLimits {
            per_key: limiter(
                config.per_key_per_second,
                second,
                config.per_key_burst,
                tracked,
            ),
            per_address: limiter(
                config.per_address_per_second,
                second,
                config.per_address_burst,
                tracked,
            ),
            auth_failures: limiter(
                config.auth_failures_per_minute,
                Duration::from_secs(60),
                config.auth_failures_burst,
                tracked,
            ),
            blocked: Mutex::new(HashMap::new()),
            max_tracked: tracked,
            clock: DefaultClock::default(),
        }
    }

    /// Before anything else: is the address blocked for failed authentication, or over
    /// its request rate?
    pub fn check_address(&self, addr: AddrKey) -> Result<(), Limited> {
        {
            let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(until) = blocked.get(&addr).copied() {
                let now = Instant::now();
                if until > now {
                    return Err(Limited(until - now));
                }
                blocked.remove(&addr);
            }
        }
        self.check(self.per_address.as_ref(), &addr)
    }

    /// After a key authenticated: is it over its request rate?
    pub fn check_key(&self, key_id: &str) -> Result<(), Limited> {
        match &self.per_key {
            Some(limiter) => self.check(Some(limiter), &key_id.to_owned()),
            None => Ok(()),
        }
    }

    /// Counts a failed authentication; `Err` once the address is past its budget (it is
    /// then blocked until the budget refills).
    pub fn auth_failed(&self, addr: AddrKey) -> Result<(), Limited> {
        let limited = self.check(self.auth_failures.as_ref(), &addr);
        if let Err(Limited(wait)) = limited {
            let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            if blocked.len() >= self.max_tracked {
                let now = Instant::now();
                blocked.retain(|_, until| *until > now);
            }
            if blocked.len() < self.max_tracked {
                blocked.insert(addr, Instant::now() + wait);
            }
        }
        limited
    }

    fn check<K: Hash + Eq + Clone>(
        &self,
        limiter: Option<&Limiter<K>>,
        key: &K,
    ) -> Result<(), Limited> {
        match limiter {
            Some(limiter) => limiter
                .check_key(key)
                .map_err(|not_until| Limited(not_until.wait_time_from(self.clock.now()))),
            None => Ok(()),
        }
    }

    /// Drops state indistinguishable from a fresh start; run now and then.
    pub fn housekeeping(&self) {
        for limiter in [&self.per_address, &self.auth_failures]
            .into_iter()
            .flatten()
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Some(limiter) = &self.per_key {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        let now = Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        blocked.retain(|_, until| *until > now);
        blocked.shrink_to_fit();
    }

    /// Addresses and keys currently tracked (for `/metrics` and tests).
    pub fn tracked(&self) -> usize {
        self.per_address.as_ref().map_or(0, |l| l.len())
            + self.auth_failures.as_ref().map_or(0, |l| l.len())
            + self.per_key.as_ref().map_or(0, |l| l.len())
            + self.blocked.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Caps on open connections, in all and per source address.
pub struct ConnectionLimits {
    max_total: usize,
    max_per_address: usize,
    total: AtomicUsize,
    per_address: Mutex<HashMap<AddrKey, usize>>,
}

/// One open connection's place; freed when dropped.
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    addr: AddrKey,
}

impl ConnectionLimits {
    pub fn new(config: &LimitsConfig) -> ConnectionLimits {
        ConnectionLimits {
            max_total: config.max_connections,
            max_per_address: config.max_connections_per_address,
            total: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
        }
    }

    /// A place for a new connection from `ip`, or `None` when a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionPermit> {
        let addr = AddrKey::of(ip);
        let mut per_address = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return None;
        }
        let count = per_address.entry(addr).or_insert(0);
        if *count >= self.max_per_address {
            return None;
        }
        *count += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionPermit {
            limits: self.clone(),
            addr,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut per_address = self
            .limits
            .per_address
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_address.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                per_address.remove(&self.addr);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(per_address: u32, failures: u32, tracked: usize) -> RateLimitConfig {
        RateLimitConfig {
            per_key_per_second: 1,
            per_key_burst: 2,
            per_address_per_second: per_address,
            per_address_burst: per_address.max(1),
            auth_failures_per_minute: failures,
            auth_failures_burst: failures.max(1),
            max_tracked_addresses: tracked,
        }
    }

    #[test]
    fn ipv6_addresses_group_by_64_and_never_meet_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(AddrKey::of(a), AddrKey::of(b));
        assert_ne!(AddrKey::of(a), AddrKey::of(c));
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(AddrKey::of(v4), AddrKey::of(mapped));
        assert_ne!(AddrKey::of("::".parse().unwrap()), AddrKey::of(v4));
        assert_ne!(
            AddrKey::of("::1".parse().unwrap()),
            AddrKey::of("0.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn failures_block_the_address_before_its_keys_are_checked() {
        let limits = RateLimits::new(&config(0, 3, 100));
        let addr = AddrKey::of("192.0.2.1".parse().unwrap());
        for _ in 0..3 {
            limits.auth_failed(addr).unwrap();
        }
        let Limited(wait) = limits.auth_failed(addr).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(20));
        assert!(limits.check_address(addr).is_err());
        let other = AddrKey::of("192.0.2.2".parse().unwrap());
        assert!(limits.check_address(other).is_ok());
    }

    #[test]
    fn rotating_addresses_share_one_budget_once_the_table_is_full() {
        let limits = RateLimits::new(&config(1, 0, 10));
        for i in 0..10u32 {
            let addr = AddrKey::of(IpAddr::V4(i.into()));
            limits.check_address(addr).unwrap();
        }
        // The table is full: the next new addresses share the overflow budget of 1.
        let fresh = |i: u32| AddrKey::of(IpAddr::V4((1000 + i).into()));
        limits.check_address(fresh(0)).unwrap();
        assert!(limits.check_address(fresh(1)).is_err());
        assert!(limits.check_address(fresh(2)).is_err());
        assert_eq!(limits.per_address.as_ref().unwrap().len(), 10);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(Limited(Duration::from_millis(1)).retry_after_secs(), 1);
        assert_eq!(Limited(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(Limited(Duration::from_secs(2)).retry_after_secs(), 2);
        assert_eq!(Limited(Duration::from_millis(2500)).retry_after_secs(), 3);
    }

    #[test]
    fn connection_caps_free_their_place_on_drop() {
        let mut limits_config = crate::config::Config::defaults().limits;
        limits_config.max_connections = 3;
        limits_config.max_connections_per_address = 2;
        let limits = Arc::new(ConnectionLimits::new(&limits_config));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none(), "per-address cap");
        let _third = limits.admit(b).unwrap();
        assert!(limits.admit(b).is_none(), "total cap");
        drop(first);
        assert!(limits.admit(a).is_some());
    }
}
