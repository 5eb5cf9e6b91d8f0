//! The state machine every outgoing message follows:
//!
//! ```text
//!            +--------> held --------+------> delivered
//!            |           ^           |
//! queued ----+--> sent --+-----------+------> delivered
//!   |  ^          |  |                
//!   |  +----------+  +---------------------> undeliverable
//!   +--------------------------------------> undeliverable
//! ```
//!
//! `queued`: written to `peer.db`, not yet on any path. `sent`: written to a
//! path (direct now); a broken link puts it back to `queued` to be resent.
//! `held`: sealed and stored by the tracker for an offline recipient; the
//! tracker owns its delivery from then on. `delivered` (the receiver's
//! acknowledgement or signed receipt came back) and `undeliverable` (with a
//! reason) are final: nothing moves a message out of them.

use crate::event::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Queued,
    Sent(Path),
    Held,
    Delivered(Path),
    Undeliverable(String),
}

impl State {
    pub fn is_final(&self) -> bool {
        matches!(self, State::Delivered(_) | State::Undeliverable(_))
    }

    pub fn name(&self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Sent(_) => "sent",
            State::Held => "held",
            State::Delivered(_) => "delivered",
            State::Undeliverable(_) => "undeliverable",
        }
    }

    /// Whether a message in this state may move to `next`.
    pub fn may_become(&self, next: &State) -> bool {
        use State::*;
        match (self, next) {
            (Delivered(_) | Undeliverable(_), _) => false,
            (Queued, Queued) => false,
            (Queued, Sent(_) | Held | Undeliverable(_)) => true,
            (Queued, Delivered(_)) => false,
            (Sent(_), _) => true,
            (Held, Delivered(_) | Undeliverable(_)) => true,
            (Held, _) => false,
        }
    }

    /// (state, path, reason) as stored in `peer.db`.
    pub fn columns(&self) -> (&'static str, Option<&'static str>, Option<&str>) {
        match self {
            State::Queued | State::Held => (self.name(), None, None),
            State::Sent(p) | State::Delivered(p) => (self.name(), Some(p.as_str()), None),
            State::Undeliverable(r) => (self.name(), None, Some(r)),
        }
    }

    pub fn from_columns(state: &str, path: Option<&str>, reason: Option<&str>) -> Option<Self> {
        let path = || path.and_then(Path::parse);
        Some(match state {
            "queued" => State::Queued,
            "held" => State::Held,
            "sent" => State::Sent(path()?),
            "delivered" => State::Delivered(path()?),
            "undeliverable" => State::Undeliverable(reason.unwrap_or("").to_string()),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [fn() -> State; 5] = [
        || State::Queued,
        || State::Sent(Path::Direct),
        || State::Held,
        || State::Delivered(Path::Direct),
        || State::Undeliverable("x".into()),
    ];

    #[test]
    fn final_states_never_move() {
        for from in [
            State::Delivered(Path::Held),
            State::Undeliverable("r".into()),
        ] {
            for to in ALL {
                assert!(!from.may_become(&to()), "{from:?} -> {:?}", to());
            }
        }
    }

    #[test]
    fn a_message_is_delivered_only_after_it_left_this_machine() {
        assert!(!State::Queued.may_become(&State::Delivered(Path::Direct)));
        assert!(State::Sent(Path::Direct).may_become(&State::Delivered(Path::Direct)));
        assert!(State::Held.may_become(&State::Delivered(Path::Held)));
    }

    #[test]
    fn a_broken_link_requeues_but_a_held_message_stays_with_the_tracker() {
        assert!(State::Sent(Path::Direct).may_become(&State::Queued));
        assert!(State::Sent(Path::Direct).may_become(&State::Held));
        assert!(!State::Held.may_become(&State::Queued));
        assert!(!State::Held.may_become(&State::Sent(Path::Direct)));
    }

    #[test]
    fn states_round_trip_through_their_columns() {
        for s in ALL {
            let s = s();
            let (state, path, reason) = s.columns();
            assert_eq!(State::from_columns(state, path, reason), Some(s));
        }
    }
}
