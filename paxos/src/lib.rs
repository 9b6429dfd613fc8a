//! Sans-I/O Multi-Paxos core.
