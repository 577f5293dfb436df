//! A controller of one object that stands for "everything", for a concern that derives one
//! whole state from all it watches (as linkerd2's policy index does): every watched change
//! triggers the same [`Singleton`], so changes queue — and are handled — as one reconcile
//! that reads the caches whole.
//!
//! The singleton is handed to the controller only once the caches the reconcile reads have
//! completed their first list (the `ready` future of [`controller`]), so the first
//! reconcile — and `/readyz` — never see a partial view.
//!
//! ```no_run
//! # use tendril_runtime::{Caches, debounce::ChangeClock, singleton};
//! # use k8s_openapi::api::core::v1::ConfigMap;
//! # fn f(caches: Caches, clock: ChangeClock) {
//! let config_maps = caches.all::<ConfigMap>();
//! let ready = {
//!     let store = config_maps.store();
//!     async move { let _ = store.wait_until_ready().await; }
//! };
//! let controller = singleton::controller("example", ready)
//!     .watches_stream(config_maps.trigger(), singleton::on_change("example", Some(&clock)));
//! # }
//! ```

use crate::debounce::ChangeClock;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::future::Future;

/// The key of the one reconcile of a concern (named after it). It lives only in the
/// controller's local store, never in the API.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Singleton {
    pub metadata: ObjectMeta,
}

impl Singleton {
    pub fn new(name: &str) -> Self {
        Self {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
        }
    }
}

impl Resource for Singleton {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Singleton".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "tendril.dev".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "singletons".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A controller whose only object is the [`Singleton`] `name`, handed to it once `ready`
/// completes. Add the watches with `watches_stream(cache.trigger(), on_change(..))`.
pub fn controller(
    name: &str,
    ready: impl Future<Output = ()> + Send + 'static,
) -> Controller<Singleton> {
    let (store, mut writer) = reflector::store::<Singleton>();
    let one = Singleton::new(name);
    let first = async move {
        ready.await;
        // A complete "list" of one object (InitDone swaps the listed objects in).
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(one.clone()));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        Ok(one)
    };
    let trigger = futures::stream::once(first).chain(futures::stream::pending());
    Controller::for_stream(trigger, store)
}

/// The trigger mapper of a watch: every change means "reconcile everything"; with a
/// `clock`, the change is also observed on it (changes of intent; a concern's own writes
/// coming back are not).
pub fn on_change<K>(
    name: &str,
    clock: Option<&ChangeClock>,
) -> impl Fn(K) -> Option<ObjectRef<Singleton>> + Send + Sync + 'static + use<K> {
    let clock = clock.cloned();
    let all = ObjectRef::new(name);
    move |_| {
        if let Some(clock) = &clock {
            clock.observe();
        }
        Some(all.clone())
    }
}

/// [`on_change`] only while `relevant` says yes: for the inputs a concern reads only on
/// behalf of its policies (pods, Services, Nodes), which wake nothing while there is no
/// policy. The change that creates the first policy triggers a recompute that reads every
/// cache whole, so nothing gated away is missed.
pub fn on_change_while<K, F>(
    name: &str,
    clock: Option<&ChangeClock>,
    relevant: F,
) -> impl Fn(K) -> Option<ObjectRef<Singleton>> + Send + Sync + 'static + use<K, F>
where
    F: Fn() -> bool + Send + Sync + 'static,
{
    let on_change = on_change::<K>(name, clock);
    move |k| if relevant() { on_change(k) } else { None }
}

/// [`on_change_while`] there is at least one object in `policies`.
pub fn on_change_while_any<K, P>(
    name: &str,
    clock: Option<&ChangeClock>,
    policies: &reflector::Store<P>,
) -> impl Fn(K) -> Option<ObjectRef<Singleton>> + Send + Sync + 'static + use<K, P>
where
    P: Resource + Clone + Send + Sync + 'static,
    P::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let policies = policies.clone();
    on_change_while(name, clock, move || !policies.state().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_change_triggers_the_singleton_and_observes_only_with_a_clock() {
        let clock = ChangeClock::new(Duration::from_secs(60), Duration::from_secs(60));
        let observed = on_change::<u8>("policy", Some(&clock));
        let silent = on_change::<u8>("policy", None);
        assert_eq!(silent(1), Some(ObjectRef::new("policy")));
        assert!(clock.wait(std::time::Instant::now()).is_none());
        assert_eq!(observed(1), Some(ObjectRef::new("policy")));
        assert!(clock.wait(std::time::Instant::now()).is_some());
    }

    #[test]
    fn a_gated_change_wakes_nothing_and_starts_no_clock() {
        let clock = ChangeClock::new(Duration::from_secs(60), Duration::from_secs(60));
        let policies = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate = policies.clone();
        let mapper = on_change_while::<u8, _>("egress", Some(&clock), move || {
            gate.load(std::sync::atomic::Ordering::Relaxed)
        });
        assert_eq!(mapper(1), None);
        assert!(clock.wait(std::time::Instant::now()).is_none());
        policies.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(mapper(1), Some(ObjectRef::new("egress")));
        assert!(clock.wait(std::time::Instant::now()).is_some());
    }
}
