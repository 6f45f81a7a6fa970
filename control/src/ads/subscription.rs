//! One resource type's half of an ADS stream: what the gateway subscribed to, what it holds, and the one
//! response in flight. Pure: the stream feeds it requests and resources and sends the pushes it returns.
//!
//! What the gateway holds is what it ACKed, and also what it NACKed: the refused response counts as
//! delivered (the gateway keeps its last good version of the refused resources), so the same versions are
//! not sent again and again; the next change of those resources is.
//!
//! The work per push and per answer is proportional to the names involved, not to what the gateway holds: the
//! stream says which names may have changed ([`TypeState::mark_changed`]), only those are compared with what
//! the gateway holds, and an answer applies the response's names alone.

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

/// A change of what the gateway holds: name -> its version, `None` when it no longer holds it.
pub type HeldChange = (String, Option<String>);

/// An answer to the response in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub nonce: String,
    pub answer: Answer,
    /// What the answered response delivered (a removal as `None`): held from now on if ACKed, refused if not.
    pub delivered: Vec<HeldChange>,
    /// What the gateway's own requests changed since the last answer: the versions a reconnecting gateway
    /// said it holds, and the names it unsubscribed from (`None`).
    pub requested: Vec<HeldChange>,
    /// When the first mesh change folded into the answered response was seen.
    pub changed_at: Instant,
}

#[derive(Debug, Clone, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
}

/// The names that may have changed since the last push.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Names(BTreeSet<String>),
    /// Unknown: every resource is compared.
    All,
}

impl Pending {
    fn add<'n>(&mut self, names: impl IntoIterator<Item = &'n String>) {
        if let Pending::Names(pending) = self {
            pending.extend(names.into_iter().cloned());
        }
    }
}

#[derive(Debug)]
struct InFlight {
    nonce: String,
    /// What the gateway holds once it answers, relative to `held`.
    delivered: Vec<HeldChange>,
    /// Names forgotten while in flight: the answer does not make them held (they are sent again).
    forgotten: BTreeSet<String>,
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
    pending: Pending,
    /// For the next [`Outcome::requested`].
    requested: Vec<HeldChange>,
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
            pending: Pending::Names(BTreeSet::new()),
            requested: Vec::new(),
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
            self.requested.extend(self.held.iter().map(|(name, version)| (name.clone(), Some(version.clone()))));
            self.pending = Pending::All;
            return;
        };
        let was_wildcard = subscription.wildcard;
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
            } else if subscription.names.remove(name) {
                resend.push(name.clone());
                self.requested.push((name.clone(), None));
            }
        }
        if subscription.wildcard != was_wildcard {
            self.subscription_widened_or_narrowed();
        }
        self.forget(&resend);
    }

    /// A state-of-the-world request's names: the whole subscription, replaced. An empty first request is the
    /// wildcard; newly named resources are sent even if the gateway held them before.
    pub fn sotw_subscribe(&mut self, names: &[String]) {
        let wanted: BTreeSet<String> = names.iter().filter(|n| *n != WILDCARD).cloned().collect();
        let explicit_wildcard = names.iter().any(|n| n == WILDCARD);
        let Some(subscription) = &mut self.subscription else {
            self.subscription = Some(Subscription { wildcard: names.is_empty() || explicit_wildcard, names: wanted });
            self.pending = Pending::All;
            return;
        };
        let wildcard = explicit_wildcard || (subscription.wildcard && names.is_empty());
        if wildcard == subscription.wildcard && wanted == subscription.names {
            return;
        }
        let changed: Vec<String> = wanted.symmetric_difference(&subscription.names).cloned().collect();
        let dropped = subscription.names.difference(&wanted).map(|name| (name.clone(), None));
        self.requested.extend(dropped);
        let was_wildcard = subscription.wildcard;
        *subscription = Subscription { wildcard, names: wanted };
        if wildcard != was_wildcard {
            self.subscription_widened_or_narrowed();
        }
        self.forget(&changed);
    }

    /// The wildcard came or went: everything is looked at again, and a named subscription holds its names
    /// alone. Rare, so a whole pass.
    fn subscription_widened_or_narrowed(&mut self) {
        self.pending = Pending::All;
        let Some(subscription) = self.subscription.as_ref().filter(|s| !s.wildcard) else {
            return;
        };
        let (held, requested) = (&mut self.held, &mut self.requested);
        held.retain(|name, _| {
            let kept = subscription.names.contains(name);
            if !kept {
                requested.push((name.clone(), None));
            }
            kept
        });
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
        let InFlight { nonce, delivered, forgotten, changed_at } = self.in_flight.take()?;
        for (name, version) in delivered.iter().filter(|(name, _)| !forgotten.contains(name)) {
            match version {
                Some(version) => self.held.insert(name.clone(), version.clone()),
                None => self.held.remove(name),
            };
        }
        let answer = match error {
            None => Answer::Ack,
            Some(message) => Answer::Nack { message },
        };
        Some(Outcome { nonce, answer, delivered, requested: std::mem::take(&mut self.requested), changed_at })
    }

    /// Anything may have changed: every resource is looked at again.
    pub fn mark_all(&mut self) {
        self.pending = Pending::All;
    }

    /// These names may have changed (been added, changed or removed); the others did not.
    pub fn mark_changed<'n>(&mut self, names: impl IntoIterator<Item = &'n String>) {
        self.pending.add(names);
    }

    /// Sends these names again at the next push even if the gateway holds their version (an EDS assignment
    /// after its cluster was replaced: the new cluster warms until it gets one).
    pub fn forget(&mut self, names: &[String]) {
        for name in names {
            self.held.remove(name);
            if let Some(in_flight) = &mut self.in_flight {
                in_flight.forgotten.insert(name.clone());
            }
        }
        self.pending.add(names);
    }

    /// The response that brings the gateway to `resources`, if it needs one and none is in flight.
    pub fn next_push(
        &mut self,
        resources: &BTreeMap<String, Versioned>,
        nonce: impl FnOnce() -> String,
        changed_at: Instant,
    ) -> Option<Push> {
        let subscription = self.subscription.as_ref()?;
        if self.in_flight.is_some() {
            return None;
        }
        let pending = std::mem::replace(&mut self.pending, Pending::Names(BTreeSet::new()));
        let wanted = |name: &String| subscription.wildcard || subscription.names.contains(name);
        let differs = |name: &String, resource: &Versioned| self.held.get(name) != Some(&resource.version);
        // Only a wildcard subscription learns of removals; a named one hears of them through the type that
        // names them (an assignment through its cluster's removal).
        let (changed, removed): (Vec<(&String, &Versioned)>, Vec<String>) = match &pending {
            Pending::All => {
                let changed = resources.iter().filter(|(name, r)| wanted(name) && differs(name, r)).collect();
                let removed = match subscription.wildcard {
                    true => self.held.keys().filter(|name| !resources.contains_key(*name)).cloned().collect(),
                    false => Vec::new(),
                };
                (changed, removed)
            }
            Pending::Names(names) => {
                let (mut changed, mut removed) = (Vec::new(), Vec::new());
                for name in names.iter().filter(|name| wanted(name)) {
                    match resources.get_key_value(name) {
                        Some((name, resource)) if differs(name, resource) => changed.push((name, resource)),
                        Some(_) => {}
                        None if subscription.wildcard && self.held.contains_key(name) => removed.push(name.clone()),
                        None => {}
                    }
                }
                (changed, removed)
            }
        };
        let first = subscription.wildcard && !self.answered;
        if changed.is_empty() && removed.is_empty() && !first {
            return None;
        }
        let updated =
            changed.iter().filter(|(name, _)| self.held.contains_key(*name)).map(|(n, _)| (*n).clone()).collect();
        let mut delivered: Vec<HeldChange> =
            changed.iter().map(|(name, resource)| ((*name).clone(), Some(resource.version.clone()))).collect();
        delivered.extend(removed.iter().map(|name| (name.clone(), None)));
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
        self.in_flight = Some(InFlight { nonce: nonce.clone(), delivered, forgotten: BTreeSet::new(), changed_at });
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
        state.mark_all();
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

    fn next(state: &mut TypeState, resources: &BTreeMap<String, Versioned>) -> Option<Push> {
        state.next_push(resources, || "n".to_owned(), Instant::now())
    }

    #[test]
    fn the_marked_names_are_pushed_and_what_changes_in_flight_follows_the_answer() {
        let mut state = TypeState::new(Mode::Delta);
        state.delta_subscribe(&[], &[], &HashMap::new());
        push(&mut state, &resources(&[("a", "1"), ("b", "1"), ("c", "1")])).unwrap();
        state.answer("n", None).unwrap();
        // a changed and c went.
        let changed = resources(&[("a", "2"), ("b", "1")]);
        state.mark_changed(&strings(&["a", "c"]));
        let update = next(&mut state, &changed).unwrap();
        assert_eq!(
            (names(&update), update.removed.clone(), update.updated.clone()),
            (vec!["a"], strings(&["c"]), strings(&["a"]))
        );
        // b changes while that response is in flight: it follows the answer.
        let later = resources(&[("a", "2"), ("b", "2")]);
        state.mark_changed(&strings(&["b"]));
        assert_eq!(next(&mut state, &later), None, "one response in flight");
        let outcome = state.answer("n", None).unwrap();
        assert_eq!(outcome.delivered, [("a".to_owned(), Some("2".to_owned())), ("c".to_owned(), None)]);
        assert_eq!(names(&next(&mut state, &later).unwrap()), ["b"]);
        state.answer("n", None).unwrap();
        // A marked name the gateway holds at its version is not sent again.
        state.mark_changed(&strings(&["a", "b"]));
        assert_eq!(next(&mut state, &later), None);
    }

    #[test]
    fn a_named_subscription_gets_its_marked_names_only_and_a_forgotten_one_again_after_the_answer() {
        let mut state = TypeState::new(Mode::Delta);
        state.delta_subscribe(&strings(&["a", "b"]), &[], &HashMap::new());
        let all = resources(&[("a", "1"), ("b", "1"), ("c", "1")]);
        push(&mut state, &all).unwrap();
        // Forgotten while in flight (its cluster was replaced): the answer does not make it held.
        state.forget(&strings(&["a"]));
        state.answer("n", None).unwrap();
        let changed = resources(&[("a", "1"), ("b", "1"), ("c", "2")]);
        state.mark_changed(&strings(&["c"]));
        assert_eq!(names(&next(&mut state, &changed).unwrap()), ["a"], "c is not subscribed, a is sent again");
        state.answer("n", None).unwrap();
        // A removal is not named to a named subscription.
        state.mark_changed(&strings(&["b"]));
        assert_eq!(next(&mut state, &resources(&[("a", "1")])), None);
    }

    #[test]
    fn an_outcome_says_what_the_gateway_holds_from_its_requests_and_from_the_response() {
        let mut state = TypeState::new(Mode::Delta);
        let initial = HashMap::from([("a".to_owned(), "1".to_owned())]);
        state.delta_subscribe(&strings(&["a", "b"]), &[], &initial);
        push(&mut state, &resources(&[("a", "1"), ("b", "1")])).unwrap();
        state.delta_subscribe(&[], &strings(&["a"]), &HashMap::new());
        let outcome = state.answer("n", Some("bad b".to_owned())).unwrap();
        assert_eq!(outcome.answer, Answer::Nack { message: "bad b".to_owned() });
        assert_eq!(outcome.requested, [("a".to_owned(), Some("1".to_owned())), ("a".to_owned(), None)]);
        assert_eq!(outcome.delivered, [("b".to_owned(), Some("1".to_owned()))]);
        let same = resources(&[("a", "1"), ("b", "1")]);
        assert_eq!(push(&mut state, &same), None, "the refused version counts as held: not sent again");
        state.mark_changed(&strings(&["b"]));
        assert_eq!(names(&next(&mut state, &resources(&[("b", "2")])).unwrap()), ["b"], "its next version is");
    }
}
