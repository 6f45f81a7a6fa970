//! MAGLEV (Google's Maglev, as Envoy builds it): a lookup table of a prime size M where each host fills slots
//! along its own permutation `(offset + skip·j) mod M`, taking turns in proportion to its weight. A client hashes
//! to `table[hash mod M]`: one array read per pick, and little churn when the set changes.

use super::{Draw, HostSet, Policy, PolicyParams, hash64, mix};

pub const NAME: &str = "MAGLEV";

/// Envoy's limit on `table_size`.
pub const MAX_TABLE_SIZE: u64 = 5_000_011;

#[derive(Debug)]
pub struct Maglev {
    table: Vec<u32>,
    members: Vec<usize>,
}

pub fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

pub fn build(params: &PolicyParams, set: &HostSet<'_>) -> Box<dyn Policy> {
    let size = params.table_size;
    struct Entry {
        offset: u64,
        skip: u64,
        next: u64,
        weight: u64,
        target: u64,
    }
    let mut entries: Vec<Entry> = (0..set.members.len())
        .map(|slot| {
            let h = hash64(set.hosts[set.members[slot]].spec.address.to_string().as_bytes());
            Entry { offset: h % size, skip: mix(h) % (size - 1) + 1, next: 0, weight: set.weight(slot), target: 0 }
        })
        .collect();
    let max_weight = entries.iter().map(|e| e.weight).max().unwrap_or(1);
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; size as usize];
    let mut filled = 0;
    // Envoy's weighted fill: a host of weight w takes a turn in iteration i once i·w reaches its target, which grows
    // by the largest weight with each slot it takes.
    for iteration in 0.. {
        for (slot, e) in entries.iter_mut().enumerate() {
            if filled == size {
                break;
            }
            if iteration * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            let mut c = (e.offset + e.skip * e.next) % size;
            while table[c as usize] != EMPTY {
                e.next += 1;
                c = (e.offset + e.skip * e.next) % size;
            }
            table[c as usize] = slot as u32;
            e.next += 1;
            filled += 1;
        }
        if filled == size {
            break;
        }
    }
    Box::new(Maglev { table, members: set.members.to_vec() })
}

impl Policy for Maglev {
    fn pick(&self, _: &HostSet<'_>, draw: &mut Draw<'_>) -> usize {
        let slot = self.table[(draw.source_hash % self.table.len() as u64) as usize];
        self.members[slot as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::super::{PolicyParams, tests::counts};

    #[test]
    fn primes() {
        assert!(super::is_prime(65537) && super::is_prime(251) && super::is_prime(2));
        assert!(!super::is_prime(100) && !super::is_prime(1) && !super::is_prime(65535));
    }

    #[test]
    fn small_table_fills_by_weight() {
        let params = PolicyParams { table_size: 251, ..Default::default() };
        let counts = counts(super::NAME, params, &[1, 3], 20_000);
        let share = f64::from(counts[1]) / 20_000.0;
        assert!((share - 0.75).abs() < 0.03, "{counts:?}");
    }
}
