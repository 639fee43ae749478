//! Who is in the cluster and who owns what: `[cluster]` turned into a placement every node
//! computes alike (a pure function of the config, see [`crate::ring`]).

use quiver_core::config::{ClusterConfig, ClusterNode};

use crate::ring::Ring;

#[derive(Debug, Clone)]
pub struct Membership {
    pub self_id: String,
    pub members: Vec<ClusterNode>,
    pub replication: usize,
    pub vnodes: u32,
    /// Per partition: its owners, primary first.
    placement: Vec<Vec<String>>,
}

impl Membership {
    pub fn new(config: &ClusterConfig, partitions: u32) -> Membership {
        let ids: Vec<String> = config.nodes.iter().map(|n| n.id.clone()).collect();
        let ring = Ring::new(&ids, config.vnodes);
        let placement = ring.placement(partitions, config.replication);
        assert_eq!(placement.len(), partitions as usize);
        Membership {
            self_id: config.self_id.clone(),
            members: config.nodes.clone(),
            replication: config.replication.min(ids.len()),
            vnodes: config.vnodes,
            placement,
        }
    }

    pub fn partitions(&self) -> u32 {
        self.placement.len() as u32
    }

    /// Owners of `partition`, primary first.
    pub fn owners(&self, partition: u32) -> &[String] {
        &self.placement[partition as usize]
    }

    pub fn owns(&self, partition: u32) -> bool {
        self.owners(partition).contains(&self.self_id)
    }

    /// Whether this node is `partition`'s primary (it runs the partition's history sink
    /// while it is up).
    pub fn is_primary(&self, partition: u32) -> bool {
        self.owners(partition).first() == Some(&self.self_id)
    }

    /// The partitions this node owns, ascending.
    pub fn owned(&self) -> Vec<u32> {
        (0..self.partitions()).filter(|&p| self.owns(p)).collect()
    }

    pub fn member(&self, id: &str) -> Option<&ClusterNode> {
        self.members.iter().find(|m| m.id == id)
    }

    /// The other members.
    pub fn peers(&self) -> impl Iterator<Item = &ClusterNode> {
        self.members.iter().filter(|m| m.id != self.self_id)
    }

    /// Placement per partition (owners, primary first).
    pub fn placement(&self) -> &[Vec<String>] {
        &self.placement
    }
}

/// `[cluster]` for tests: members `ids` on ports 7000…, `self_id`, `replication`.
#[cfg(test)]
pub(crate) fn test_config(self_id: &str, ids: &[&str], replication: usize) -> ClusterConfig {
    use quiver_core::config::HumanDuration;
    use std::time::Duration;
    ClusterConfig {
        self_id: self_id.into(),
        nodes: ids
            .iter()
            .enumerate()
            .map(|(i, id)| ClusterNode {
                id: (*id).into(),
                http: format!("127.0.0.1:{}", 7000 + i),
                grpc: None,
            })
            .collect(),
        replication,
        vnodes: 64,
        probe_interval: HumanDuration(Duration::from_millis(100)),
        down_after: HumanDuration(Duration::from_millis(500)),
        forward_timeout: HumanDuration(Duration::from_secs(1)),
        ca: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(self_id: &str, ids: &[&str], replication: usize) -> ClusterConfig {
        test_config(self_id, ids, replication)
    }

    #[test]
    fn every_partition_has_replication_owners_and_each_node_agrees() {
        let ids = ["n1", "n2", "n3"];
        let views: Vec<Membership> = ids
            .iter()
            .map(|s| Membership::new(&config(s, &ids, 2), 16))
            .collect();
        for p in 0..16 {
            let owners = views[0].owners(p);
            assert_eq!(owners.len(), 2);
            assert_ne!(owners[0], owners[1]);
            for m in &views {
                assert_eq!(m.owners(p), owners, "placement is the same on every node");
                assert_eq!(m.owns(p), owners.contains(&m.self_id));
            }
        }
        let total: usize = views.iter().map(|m| m.owned().len()).sum();
        assert_eq!(total, 32, "16 partitions × 2 owners");
    }

    #[test]
    fn replication_is_capped_at_the_cluster_size() {
        let m = Membership::new(&config("n1", &["n1"], 3), 4);
        assert_eq!(m.replication, 1);
        assert_eq!(m.owned(), vec![0, 1, 2, 3]);
        assert!((0..4).all(|p| m.is_primary(p)));
    }
}
