//! A TCP forwarder on loopback whose upstream can be moved while it runs, as a database's address (a DNS name, a
//! floating IP) is moved to a promoted standby: new connections go to the new upstream, and every connection to the
//! old one is cut, as a failover cuts them.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The forwarder; it stops when dropped.
pub struct SwitchableProxy {
    /// The loopback port clients connect to.
    pub port: u16,
    upstream: Arc<AtomicU16>,
    /// Bumped on every switch; each forwarded connection ends when it changes.
    generation: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl SwitchableProxy {
    /// Forwards a free loopback port to `127.0.0.1:{upstream_port}`.
    pub async fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("a loopback port for the proxy");
        let port = listener.local_addr().expect("a bound address").port();
        let upstream = Arc::new(AtomicU16::new(upstream_port));
        let (generation, _) = watch::channel(0u64);
        let task = {
            let upstream = upstream.clone();
            let generation = generation.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let target = upstream.load(Ordering::SeqCst);
                    let mut switched = generation.subscribe();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                            return;
                        };
                        let (mut client, mut server) = (client, server);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = switched.changed() => {}
                        }
                    });
                }
            })
        };
        Self {
            port,
            upstream,
            generation,
            task,
        }
    }

    /// Sends new connections to `127.0.0.1:{upstream_port}` and cuts every connection made before.
    pub fn switch_to(&self, upstream_port: u16) {
        self.upstream.store(upstream_port, Ordering::SeqCst);
        self.generation.send_modify(|generation| *generation += 1);
    }
}

impl Drop for SwitchableProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|generation| *generation += 1);
    }
}
