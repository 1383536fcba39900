//! Who is who: maps a client number to its room, server, role, worker and source address.
//! Pure and deterministic, so the coordinator and every worker agree without talking.

use crate::config::{Config, Route};

/// Where one client goes and what it does there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Room number: the client joins `lt-<room>`.
    pub room: u32,
    /// Index into the server list.
    pub server: u32,
    /// A room on one server: `room * servers + server`. Sequence numbers are per instance.
    pub instance: u32,
    /// Publishes as well as receives.
    pub publisher: bool,
    /// Publisher number within its room (0..publishers), used to stagger send times.
    pub publisher_rank: u32,
}

/// The fixed shape of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub clients: u32,
    pub rooms: u32,
    pub servers: u32,
    pub route: Route,
    pub publishers: u32,
    pub procs: u32,
}

impl Plan {
    pub fn new(config: &Config, servers: u32, procs: u32) -> Self {
        Plan {
            clients: config.clients,
            rooms: config.rooms,
            servers,
            route: config.route,
            publishers: config.publishers,
            procs: procs.max(1),
        }
    }

    /// Room instances (room × server) that can exist.
    pub fn instances(&self) -> u32 {
        self.rooms * self.servers
    }

    /// Client `c` is member number `k = c / rooms` of room `c % rooms`: rooms fill evenly.
    /// Members `0..publishers` of every room publish, whatever the route: `--publishers` and
    /// `--rate` are per room. With `spread` members alternate over servers, so a room's
    /// publishers are spread over the servers too.
    pub fn place(&self, c: u32) -> Placement {
        let room = c % self.rooms;
        let k = c / self.rooms;
        let server = match self.route {
            Route::Rooms => room % self.servers,
            Route::Spread => k % self.servers,
        };
        Placement {
            room,
            server,
            instance: room * self.servers + server,
            publisher: k < self.publishers,
            publisher_rank: k,
        }
    }

    /// Worker `w` owns clients `w, w + procs, w + 2·procs, …`: interleaving spreads the
    /// publishers (the low client numbers) over all workers.
    pub fn clients_of(&self, w: u32) -> impl Iterator<Item = u32> {
        (w..self.clients).step_by(self.procs as usize)
    }

    /// Number of clients worker `w` owns.
    pub fn count_of(&self, w: u32) -> u32 {
        if w >= self.clients {
            0
        } else {
            (self.clients - w).div_ceil(self.procs)
        }
    }

    /// Clients routed to each instance when every connect succeeds.
    pub fn expected_members(&self) -> Vec<u32> {
        let mut v = vec![0; self.instances() as usize];
        for c in 0..self.clients {
            v[self.place(c).instance as usize] += 1;
        }
        v
    }
}

/// Worker processes needed so that none holds more sockets than its file limit allows.
pub fn default_procs(clients: u32, hard_nofile: u64) -> u32 {
    // Headroom for the runtime, pipes, HTTP checks and sockets still closing.
    let per_proc = hard_nofile.saturating_sub(200).max(100);
    (u64::from(clients).div_ceil(per_proc)).max(1) as u32
}

/// Room name of room `i`.
pub fn room_name(i: u32) -> String {
    format!("lt-{i}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(
        clients: u32,
        rooms: u32,
        servers: u32,
        route: Route,
        publishers: u32,
        procs: u32,
    ) -> Plan {
        Plan {
            clients,
            rooms,
            servers,
            route,
            publishers,
            procs,
        }
    }

    #[test]
    fn rooms_route_keeps_a_room_on_one_server() {
        let p = plan(1000, 10, 3, Route::Rooms, 2, 4);
        for c in 0..1000 {
            let pl = p.place(c);
            assert_eq!(pl.server, pl.room % 3);
        }
        let members = p.expected_members();
        assert_eq!(members.iter().sum::<u32>(), 1000);
        // room 0 lives on server 0 only, with all its 100 members
        assert_eq!(members[0], 100);
        assert_eq!(members[1], 0);
        let pubs = (0..1000).filter(|&c| p.place(c).publisher).count();
        assert_eq!(pubs, 20);
    }

    #[test]
    fn spread_route_counts_publishers_per_room_and_spreads_them() {
        let p = plan(600, 2, 3, Route::Spread, 3, 1);
        let members = p.expected_members();
        assert_eq!(members, vec![100; 6]);
        for inst in 0..6 {
            let pubs = (0..600)
                .map(|c| p.place(c))
                .filter(|pl| pl.instance == inst && pl.publisher)
                .count();
            assert_eq!(
                pubs, 1,
                "3 publishers per room over 3 servers: instance {inst}"
            );
        }
        let one = plan(600, 2, 3, Route::Spread, 1, 1);
        for room in 0..2 {
            let pubs: Vec<Placement> = (0..600)
                .map(|c| one.place(c))
                .filter(|pl| pl.room == room && pl.publisher)
                .collect();
            assert_eq!(
                pubs.len(),
                1,
                "--publishers 1 is one per room, not per server"
            );
            assert_eq!(pubs[0].publisher_rank, 0);
        }
        // The same count in both routes.
        let rooms = plan(600, 2, 3, Route::Rooms, 2, 1);
        let spread = plan(600, 2, 3, Route::Spread, 2, 1);
        let count = |p: Plan| (0..600).filter(|&c| p.place(c).publisher).count();
        assert_eq!(count(rooms), 4);
        assert_eq!(count(spread), 4);
    }

    #[test]
    fn workers_split_clients_exactly() {
        let p = plan(1003, 10, 1, Route::Rooms, 1, 6);
        let mut seen = vec![false; 1003];
        for w in 0..6 {
            let mine: Vec<u32> = p.clients_of(w).collect();
            assert_eq!(mine.len() as u32, p.count_of(w));
            for c in mine {
                assert!(!seen[c as usize]);
                seen[c as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn default_procs_follows_the_file_limit() {
        assert_eq!(default_procs(19_000, 20_000), 1);
        assert_eq!(default_procs(100_000, 20_000), 6);
        assert_eq!(default_procs(100_000, 1_048_576), 1);
        assert_eq!(default_procs(10, 0), 1);
    }
}
