//! A loopback proxy to PostgreSQL (127.0.0.1:5432) that a test can cut — closing every
//! connection and refusing new ones — and restore on the same port: a PostgreSQL outage
//! without touching the shared server. Used by the connect tests and, through `#[path]`, by
//! the binary's end-to-end tests.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A loopback proxy to PostgreSQL that the test can cut (closing every connection) and
/// restore on the same port.
pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let p = Proxy {
            addr,
            up: Arc::new(AtomicBool::new(true)),
            conns: Arc::default(),
        };
        p.serve(listener);
        p
    }
    fn serve(&self, listener: TcpListener) {
        let (up, conns) = (self.up.clone(), self.conns.clone());
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while up.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let server = TcpStream::connect("127.0.0.1:5432").unwrap();
                        conns
                            .lock()
                            .unwrap()
                            .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                        let (mut c1, mut s1) =
                            (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let (mut c2, mut s2) = (client, server);
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut c1, &mut s1);
                            let _ = s1.shutdown(std::net::Shutdown::Both);
                        });
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut s2, &mut c2);
                            let _ = c2.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
    }
    pub fn cut(&self) {
        self.up.store(false, Ordering::Release);
        std::thread::sleep(Duration::from_millis(20)); // the accept loop sees it and drops the listener
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
    pub fn restore(&self) {
        self.up.store(true, Ordering::Release);
        let listener = TcpListener::bind(self.addr).unwrap();
        self.serve(listener);
    }
}
