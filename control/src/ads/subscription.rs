//! One resource type's half of an ADS stream: what the gateway subscribed to, what it holds, and the one
//! response in flight. Pure: the stream feeds it requests and resources and sends the pushes it returns.
//!
//! What the gateway holds is what it ACKed, and also what it NACKed: the refused response counts as
//! delivered (the gateway keeps its last good version of the refused resources), so the same versions are
//! not sent again and again; the next change of those resources is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use super::resources::Versioned;

/// `*`: every resource of the type (xDS wildcard).
const WILDCARD: &str = "*";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Incremental xDS: only what changed, removals named.
    Delta,
    /// State of the world: a wildcard type's response lists every resource, and a missing one is removed.
    StateOfTheWorld,
}

/// A response to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub nonce: String,
    pub resources: Vec<(String, Versioned)>,
    /// Delta only: names the gateway holds that no longer exist.
    pub removed: Vec<String>,
    /// The sent names that replace a version the gateway held (not first additions).
    pub updated: Vec<String>,
}

/// How the gateway answered a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ack,
    Nack { message: String },
}

/// An answer to the response in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub nonce: String,
    pub answer: Answer,
    /// What the gateway holds now: name -> version.
    pub held: BTreeMap<String, String>,
    /// When the first mesh change folded into the answered response was seen.
    pub changed_at: Instant,
}

#[derive(Debug, Clone, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
}

#[derive(Debug)]
struct InFlight {
    nonce: String,
    /// What the gateway holds once it answers.
    held_after: BTreeMap<String, String>,
    changed_at: Instant,
}

/// The state of one type on one stream.
#[derive(Debug)]
pub struct TypeState {
    mode: Mode,
    /// `None` until the gateway asks for this type.
    subscription: Option<Subscription>,
    held: BTreeMap<String, String>,
    in_flight: Option<InFlight>,
    /// The nonce of the last response sent (a state-of-the-world request naming another one is stale).
    last_nonce: String,
    /// Whether the first response was sent: a wildcard subscription is answered even when empty, which is
    /// what ends the gateway's initial fetch.
    answered: bool,
    /// Something may have changed since the last look.
    dirty: bool,
}

impl TypeState {
    pub fn new(mode: Mode) -> Self {
        TypeState {
            mode,
            subscription: None,
            held: BTreeMap::new(),
            in_flight: None,
            last_nonce: String::new(),
            answered: false,
            dirty: false,
        }
    }

    /// A delta request's subscription changes. The first request of the type subscribes, and seeds what the
    /// gateway holds from `initial_versions` (a reconnecting gateway: only what differs is sent again); an
    /// empty first subscription is the legacy wildcard. A name subscribed later is sent even if the gateway
    /// seems to hold it (it may have dropped it before re-subscribing: xDS requires the answer).
    pub fn delta_subscribe(&mut self, subscribe: &[String], unsubscribe: &[String], initial: &HashMap<String, String>) {
        let Some(subscription) = &mut self.subscription else {
            let wildcard = subscribe.is_empty() || subscribe.iter().any(|n| n == WILDCARD);
            let names = subscribe.iter().filter(|n| *n != WILDCARD).cloned().collect();
            self.subscription = Some(Subscription { wildcard, names });
            self.held = initial.iter().map(|(name, version)| (name.clone(), version.clone())).collect();
            self.dirty = true;
            return;
        };
        let mut resend = Vec::new();
        for name in subscribe {
            if name == WILDCARD {
                subscription.wildcard = true;
            } else {
                subscription.names.insert(name.clone());
                resend.push(name.clone());
            }
        }
        for name in unsubscribe {
            if name == WILDCARD {
                subscription.wildcard = false;
            } else {
                subscription.names.remove(name);
                resend.push(name.clone());
            }
        }
        self.dirty |= !subscribe.is_empty() || !unsubscribe.is_empty();
        self.forget(&resend);
    }

    /// A state-of-the-world request's names: the whole subscription, replaced. An empty first request is the
    /// wildcard; newly named resources are sent even if the gateway held them before.
    pub fn sotw_subscribe(&mut self, names: &[String]) {
        let wanted: BTreeSet<String> = names.iter().filter(|n| *n != WILDCARD).cloned().collect();
        let explicit_wildcard = names.iter().any(|n| n == WILDCARD);
        let Some(subscription) = &mut self.subscription else {
            self.subscription = Some(Subscription { wildcard: names.is_empty() || explicit_wildcard, names: wanted });
            self.dirty = true;
            return;
        };
        let wildcard = explicit_wildcard || (subscription.wildcard && names.is_empty());
        if wildcard == subscription.wildcard && wanted == subscription.names {
            return;
        }
        let changed: Vec<String> = wanted.symmetric_difference(&subscription.names).cloned().collect();
        *subscription = Subscription { wildcard, names: wanted };
        self.dirty = true;
        self.forget(&changed);
    }

    /// Whether a state-of-the-world request naming `nonce` is current: the first of its type (no nonce), or
    /// naming the last response sent. A stale one is ignored whole, as xDS prescribes: the gateway sends its
    /// subscription again with the newer nonce.
    pub fn sotw_is_current(&self, nonce: &str) -> bool {
        nonce.is_empty() || nonce == self.last_nonce
    }

    /// The answer to the response in flight, if `nonce` names it.
    pub fn answer(&mut self, nonce: &str, error: Option<String>) -> Option<Outcome> {
        if nonce.is_empty() || self.in_flight.as_ref().is_none_or(|f| f.nonce != nonce) {
            return None;
        }
        let InFlight { nonce, held_after, changed_at } = self.in_flight.take()?;
        self.held = held_after;
        if let Some(subscription) = self.subscription.as_ref().filter(|s| !s.wildcard) {
            // Names unsubscribed while the response was in flight are no longer the gateway's.
            self.held.retain(|name, _| subscription.names.contains(name));
        }
        self.dirty = true;
        let answer = match error {
            None => Answer::Ack,
            Some(message) => Answer::Nack { message },
        };
        Some(Outcome { nonce, answer, held: self.held.clone(), changed_at })
    }

    /// The resources changed: look again.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Sends these names again at the next push even if the gateway holds their version (an EDS assignment
    /// after its cluster was replaced: the new cluster warms until it gets one).
    pub fn forget(&mut self, names: &[String]) {
        for name in names {
            self.held.remove(name);
            if let Some(in_flight) = &mut self.in_flight {
                in_flight.held_after.remove(name);
            }
        }
        self.dirty |= !names.is_empty();
    }

    /// The response that brings the gateway to `resources`, if it needs one and none is in flight.
    pub fn next_push(
        &mut self,
        resources: &BTreeMap<String, Versioned>,
        nonce: impl FnOnce() -> String,
        changed_at: Instant,
    ) -> Option<Push> {
        let subscription = self.subscription.as_ref()?;
        if !self.dirty || self.in_flight.is_some() {
            return None;
        }
        self.dirty = false;
        let wanted = |name: &String| subscription.wildcard || subscription.names.contains(name);
        let changed: Vec<(&String, &Versioned)> = resources
            .iter()
            .filter(|(name, resource)| wanted(name) && self.held.get(*name) != Some(&resource.version))
            .collect();
        // Only a wildcard subscription learns of removals; a named one hears of them through the type that
        // names them (an assignment through its cluster's removal).
        let removed: Vec<String> = if subscription.wildcard {
            self.held.keys().filter(|name| !resources.contains_key(*name)).cloned().collect()
        } else {
            Vec::new()
        };
        let first = subscription.wildcard && !self.answered;
        if changed.is_empty() && removed.is_empty() && !first {
            return None;
        }
        let mut held_after = self.held.clone();
        for name in &removed {
            held_after.remove(name);
        }
        let updated =
            changed.iter().filter(|(name, _)| self.held.contains_key(*name)).map(|(n, _)| (*n).clone()).collect();
        for (name, resource) in &changed {
            held_after.insert((*name).clone(), resource.version.clone());
        }
        let sent: Vec<(String, Versioned)> = match (self.mode, subscription.wildcard) {
            // The state of the world: every resource, or the gateway removes the ones left out.
            (Mode::StateOfTheWorld, true) => {
                resources.iter().filter(|(name, _)| wanted(name)).map(|(n, r)| (n.clone(), r.clone())).collect()
            }
            _ => changed.into_iter().map(|(n, r)| (n.clone(), r.clone())).collect(),
        };
        let nonce = nonce();
        self.answered = true;
        self.last_nonce.clone_from(&nonce);
        self.in_flight = Some(InFlight { nonce: nonce.clone(), held_after, changed_at });
        let removed = if self.mode == Mode::Delta { removed } else { Vec::new() };
        Some(Push { nonce, resources: sent, removed, updated })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use envoy_types::pb::google::protobuf::Any;

    use super::*;

    fn resources(entries: &[(&str, &str)]) -> BTreeMap<String, Versioned> {
        entries
            .iter()
            .map(|(name, version)| {
                ((*name).to_owned(), Versioned { version: (*version).to_owned(), resource: Arc::new(Any::default()) })
            })
            .collect()
    }

    /// As the stream does at each mesh version.
    fn push(state: &mut TypeState, resources: &BTreeMap<String, Versioned>) -> Option<Push> {
        state.mark_dirty();
        state.next_push(resources, || "n".to_owned(), Instant::now())
    }

    fn names(push: &Push) -> Vec<&str> {
        push.resources.iter().map(|(name, _)| name.as_str()).collect()
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_wildcard_delta_subscription_gets_changes_and_removals_and_an_empty_first_answer() {
        let mut state = TypeState::new(Mode::Delta);
        assert_eq!(push(&mut state, &resources(&[("a", "1")])), None, "not subscribed yet");
        state.delta_subscribe(&[], &[], &HashMap::new());
        let first = push(&mut state, &BTreeMap::new()).unwrap();
        assert!(first.resources.is_empty(), "answered even when empty");
        assert_eq!(push(&mut state, &resources(&[("a", "1")])), None, "one response in flight");
        state.answer("n", None).unwrap();
        let next = push(&mut state, &resources(&[("a", "1"), ("b", "1")])).unwrap();
        assert_eq!(names(&next), ["a", "b"]);
        state.answer("n", None).unwrap();
        let next = push(&mut state, &resources(&[("a", "2")])).unwrap();
        assert_eq!(
            (names(&next), next.removed.clone(), next.updated.clone()),
            (vec!["a"], strings(&["b"]), strings(&["a"]))
        );
        state.answer("n", None).unwrap();
        assert_eq!(push(&mut state, &resources(&[("a", "2")])), None, "nothing new");
    }

    #[test]
    fn a_nacked_version_is_not_sent_again_but_the_next_one_is() {
        let mut state = TypeState::new(Mode::Delta);
        state.delta_subscribe(&strings(&["*"]), &[], &HashMap::new());
        push(&mut state, &resources(&[("a", "1")])).unwrap();
        let outcome = state.answer("n", Some("bad a".to_owned())).unwrap();
        assert_eq!(outcome.answer, Answer::Nack { message: "bad a".to_owned() });
        assert_eq!(push(&mut state, &resources(&[("a", "1")])), None);
        assert_eq!(names(&push(&mut state, &resources(&[("a", "2")])).unwrap()), ["a"]);
    }

    #[test]
    fn a_reconnecting_gateway_is_sent_only_what_differs_from_its_initial_versions() {
        let mut state = TypeState::new(Mode::Delta);
        let initial = HashMap::from([("a".to_owned(), "1".to_owned()), ("gone".to_owned(), "1".to_owned())]);
        state.delta_subscribe(&strings(&["*"]), &[], &initial);
        let first = push(&mut state, &resources(&[("a", "1"), ("b", "1")])).unwrap();
        assert_eq!((names(&first), first.removed.clone()), (vec!["b"], strings(&["gone"])));
    }

    #[test]
    fn named_subscriptions_get_their_names_and_a_resubscribed_name_again() {
        let mut state = TypeState::new(Mode::Delta);
        let all = resources(&[("a", "1"), ("b", "1"), ("c", "1")]);
        state.delta_subscribe(&strings(&["a", "b"]), &[], &HashMap::new());
        assert_eq!(names(&push(&mut state, &all).unwrap()), ["a", "b"]);
        // Unsubscribe and subscribe again before the ACK: sent again all the same.
        state.delta_subscribe(&[], &strings(&["a"]), &HashMap::new());
        state.delta_subscribe(&strings(&["a"]), &[], &HashMap::new());
        state.answer("n", None).unwrap();
        assert_eq!(names(&push(&mut state, &all).unwrap()), ["a"]);
        state.answer("n", None).unwrap();
        // A subscribed name that does not exist is not answered, and a removal is not sent by name.
        state.delta_subscribe(&strings(&["x"]), &[], &HashMap::new());
        assert_eq!(push(&mut state, &resources(&[("a", "1")])), None);
        // A forgotten name is resent.
        state.forget(&strings(&["b"]));
        assert_eq!(names(&push(&mut state, &all).unwrap()), ["b"]);
    }

    #[test]
    fn state_of_the_world_sends_everything_of_a_wildcard_type_and_ignores_stale_nonces() {
        let mut state = TypeState::new(Mode::StateOfTheWorld);
        assert!(state.sotw_is_current(""));
        state.sotw_subscribe(&[]);
        let first = push(&mut state, &resources(&[("a", "1"), ("b", "1")])).unwrap();
        assert_eq!(names(&first), ["a", "b"]);
        assert!(state.sotw_is_current("n") && !state.sotw_is_current("old"));
        state.answer("n", None).unwrap();
        let next = push(&mut state, &resources(&[("a", "2")])).unwrap();
        assert_eq!((names(&next), next.removed.len()), (vec!["a"], 0), "b is removed by its absence");

        let mut named = TypeState::new(Mode::StateOfTheWorld);
        named.sotw_subscribe(&strings(&["a"]));
        let all = resources(&[("a", "1"), ("b", "1")]);
        assert_eq!(names(&push(&mut named, &all).unwrap()), ["a"]);
        named.answer("n", None).unwrap();
        named.sotw_subscribe(&strings(&["a", "b"]));
        assert_eq!(names(&push(&mut named, &all).unwrap()), ["b"], "only the newly named one");
    }
}
