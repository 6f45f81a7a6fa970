//! The health-dependent half of a [`ClusterLb`](super::ClusterLb): per-priority loads and the host sets a pick
//! chooses from, computed from the static [`Topology`] and the hosts' current health and ejection. Rebuilt (off
//! the hot path) whenever an ejection changes; a pick only reads it.

use std::fmt;

use super::endpoint::{Health, Host};
use super::load::{Availability, locality_weight, priority_load};
use super::policy::{Draw, HostSet, Policy, PolicyRef, mix};
use super::topology::{Group, Topology};

pub(super) struct View {
    /// The ejection epoch this view was computed at.
    pub epoch: u64,
    /// Running sum of the priorities' load percentages; ends at 100, or is all zero when nothing may be picked.
    cumulative_load: Vec<u32>,
    priorities: Vec<PriorityView>,
    /// Hosts that are healthy and not ejected.
    pub healthy: usize,
}

struct PriorityView {
    #[cfg(test)]
    panic: bool,
    /// One set per available locality (locality-weighted lb), else one for the whole priority.
    sets: Vec<SetData>,
    /// Running sum of the sets' weights.
    cumulative: Vec<u64>,
}

struct SetData {
    members: Vec<usize>,
    cumulative: Vec<u64>,
    policy: Box<dyn Policy>,
}

impl SetData {
    fn new(hosts: &[Host], members: Vec<usize>, policy: &PolicyRef) -> Self {
        let cumulative: Vec<u64> = members
            .iter()
            .scan(0, |sum, i| {
                *sum += u64::from(hosts[*i].spec.weight.max(1));
                Some(*sum)
            })
            .collect();
        let policy = policy.build(&HostSet { hosts, members: &members, cumulative: &cumulative });
        SetData { members, cumulative, policy }
    }

    fn as_set<'a>(&'a self, hosts: &'a [Host]) -> HostSet<'a> {
        HostSet { hosts, members: &self.members, cumulative: &self.cumulative }
    }
}

fn available(host: &Host) -> bool {
    host.spec.health == Health::Healthy && !host.state.ejected()
}

fn members(groups: &[Group]) -> impl Iterator<Item = usize> + '_ {
    groups.iter().flat_map(|g| g.members.iter().copied())
}

fn availability(hosts: &[Host], members: impl Iterator<Item = usize>) -> Availability {
    members.fold(Availability::default(), |a, i| Availability {
        healthy: a.healthy + u64::from(available(&hosts[i])),
        total: a.total + 1,
    })
}

impl View {
    pub fn new(hosts: &[Host], topology: &Topology, policy: &PolicyRef, panic_threshold: u32, epoch: u64) -> Self {
        let per_priority: Vec<Availability> =
            topology.priorities.iter().map(|groups| availability(hosts, members(groups))).collect();
        let factor = topology.overprovisioning_factor;
        let load = priority_load(&per_priority, panic_threshold, factor);
        let priorities = topology
            .priorities
            .iter()
            .zip(&load.panic)
            .map(|(groups, panic)| {
                let set = |filter: fn(&Host) -> bool, groups: &[Group]| {
                    let m: Vec<usize> = members(groups).filter(|i| filter(&hosts[*i])).collect();
                    (!m.is_empty()).then(|| SetData::new(hosts, m, policy))
                };
                let weighted: Vec<(u64, SetData)> = if *panic {
                    // Envoy balances a priority in panic over all its hosts, ignoring localities.
                    set(|_| true, groups).map(|s| (1, s)).into_iter().collect()
                } else if topology.locality_weighted {
                    groups
                        .iter()
                        .filter_map(|g| {
                            let weight =
                                locality_weight(g.weight, availability(hosts, g.members.iter().copied()), factor);
                            set(available, std::slice::from_ref(g)).filter(|_| weight > 0).map(|s| (weight, s))
                        })
                        .collect()
                } else {
                    set(available, groups).map(|s| (1, s)).into_iter().collect()
                };
                let cumulative = weighted
                    .iter()
                    .scan(0, |sum, (w, _)| {
                        *sum += w;
                        Some(*sum)
                    })
                    .collect();
                PriorityView {
                    #[cfg(test)]
                    panic: *panic,
                    sets: weighted.into_iter().map(|(_, s)| s).collect(),
                    cumulative,
                }
            })
            .collect();
        let cumulative_load = load
            .load
            .iter()
            .scan(0, |sum, l| {
                *sum += l;
                Some(*sum)
            })
            .collect();
        let healthy = per_priority.iter().map(|a| a.healthy as usize).sum();
        View { epoch, cumulative_load, priorities, healthy }
    }

    /// Whether any host may be picked.
    pub fn routable(&self) -> bool {
        self.cumulative_load.last().is_some_and(|l| *l > 0)
    }

    /// One pick: priority by load, then locality by weight, then the policy. `point` drives the first two choices
    /// (random, or the source hash for consistent hashing).
    pub fn pick(&self, hosts: &[Host], point: u64, draw: &mut Draw<'_>) -> Option<usize> {
        if !self.routable() {
            return None;
        }
        let percent = (point % 100) as u32;
        let priority = &self.priorities[self.cumulative_load.partition_point(|l| *l <= percent)];
        let total = *priority.cumulative.last()?;
        let locality = mix(point) % total;
        let set = &priority.sets[priority.cumulative.partition_point(|w| *w <= locality)];
        Some(set.policy.pick(&set.as_set(hosts), draw))
    }

    /// The first member of any set, in priority order, that `tried` does not hold: the last resort of a retry.
    pub fn first_untried(&self, tried: &[usize]) -> Option<usize> {
        if !self.routable() {
            return None;
        }
        self.priorities.iter().flat_map(|p| &p.sets).flat_map(|s| &s.members).copied().find(|i| !tried.contains(i))
    }
}

#[cfg(test)]
impl View {
    pub fn any_panic(&self) -> bool {
        self.priorities.iter().any(|p| p.panic)
    }
}

impl fmt::Debug for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("View")
            .field("epoch", &self.epoch)
            .field("cumulative_load", &self.cumulative_load)
            .field("healthy", &self.healthy)
            .finish_non_exhaustive()
    }
}
