//! A Quiver cluster over one Kafka log (DESIGN.md §6). So far: which nodes own which
//! partitions ([`ring`]), a pure function of the membership that every node computes alike.
//! Membership, failure detection, forwarding and handover are issue 12's remaining work.

pub mod ring;
