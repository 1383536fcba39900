//! One test, two deployments: a standalone server, and two processes sharing a Redis.

use serde_json::json;

use super::nodes::{Node, Redis};

/// The servers a test runs against: `a()` and `b()` are the same process standalone and two
/// processes of one cluster otherwise.
pub struct Deployment {
    pub nodes: Vec<Node>,
    _redis: Option<Redis>,
}

impl Deployment {
    pub async fn standalone(extra: &[&str]) -> Deployment {
        Deployment {
            nodes: vec![Node::standalone(extra).await],
            _redis: None,
        }
    }

    pub async fn cluster(extra: &[&str]) -> Deployment {
        let redis = Redis::start();
        let a = Node::start(&redis, extra).await;
        let b = Node::start(&redis, extra).await;
        Deployment {
            nodes: vec![a, b],
            _redis: Some(redis),
        }
    }

    pub fn a(&self) -> &Node {
        &self.nodes[0]
    }

    pub fn b(&self) -> &Node {
        &self.nodes[self.nodes.len() - 1]
    }

    /// Waits until both nodes see `members` in `room` (which may carry a query: a password
    /// room's info wants `?password=`, as joining does).
    pub async fn wait_members(&self, room: &str, members: u64) {
        for node in &self.nodes {
            node.wait_for(
                &format!("/api/rooms/{room}"),
                &format!("{members} members in {room}"),
                super::STEP,
                |s, v| s == 200 && v["members"] == members,
            )
            .await;
        }
    }

    pub async fn publish(&self, room: &str, text: &str) -> u64 {
        let (status, v) = self
            .b()
            .post(
                &format!("/api/rooms/{room}/messages"),
                &json!({"text": text}),
            )
            .await;
        assert_eq!(status, 202, "{v}");
        v["seq"].as_u64().unwrap()
    }
}

/// Runs `$check` once standalone and once as a two-process cluster.
#[macro_export]
macro_rules! in_both_modes {
    ($check:ident $(, $arg:expr)*) => {
        mod $check {
            use super::*;

            #[tokio::test]
            async fn standalone() {
                super::$check(Deployment::standalone(&[$($arg),*]).await).await;
            }

            #[tokio::test]
            #[ignore = "needs redis-server"]
            async fn cluster() {
                super::$check(Deployment::cluster(&[$($arg),*]).await).await;
            }
        }
    };
}
