//! The blocking facade: the async client on a runtime of its own, with one
//! worker thread that runs the session (keep-alives, failover) while the
//! caller's thread blocks on each call.

use std::sync::Arc;
use std::time::Duration;

use synod_proto::{CreateMode, LeaderInfo, Sequencer, Stat};

use crate::{ClientBuilder, ClientError, Result};

/// A blocking client for programs that do not run tokio. Cheap to clone.
/// Do not call it from inside an async runtime: it would block that
/// runtime's thread.
///
/// ```no_run
/// # fn example() -> synod_client::Result<()> {
/// use synod_client::CreateMode;
///
/// let client = synod_client::Client::builder()
///     .endpoints(["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"])
///     .tls_dir("synod-dev/certs")
///     .connect_blocking()?;
/// client.create("/hello", b"world", CreateMode::Persistent)?;
/// let guard = client.lock("/locks/hello")?;
/// println!("token {}", guard.token().generation);
/// guard.release()?;
/// client.close();
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    runtime: Arc<tokio::runtime::Runtime>,
    client: crate::Client,
}

impl Client {
    /// Starts a runtime and connects as [`ClientBuilder::connect`] does.
    ///
    /// ```no_run
    /// # fn example() -> synod_client::Result<()> {
    /// let builder = synod_client::Client::builder()
    ///     .endpoints(["127.0.0.1:7101"])
    ///     .tls_dir("synod-dev/certs");
    /// let client = synod_client::blocking::Client::connect(builder)?;
    /// # let _ = client;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`ClientBuilder::connect`]; [`ClientError::Config`] when the
    /// runtime cannot start.
    pub fn connect(builder: ClientBuilder) -> Result<Client> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("synod-client")
            .enable_all()
            .build()
            .map_err(|error| ClientError::Config(format!("cannot start a runtime: {error}")))?;
        let client = runtime.block_on(builder.connect())?;
        Ok(Client {
            runtime: Arc::new(runtime),
            client,
        })
    }

    /// The async client underneath, for the calls this facade lacks (run
    /// them on [`Client::block_on`]).
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// let inner = client.async_client().clone();
    /// client.block_on(async move { inner.sync().await })?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn async_client(&self) -> &crate::Client {
        &self.client
    }

    /// Runs a future on the facade's runtime and blocks until it is done.
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) {
    /// let answer = client.block_on(async { 42 });
    /// assert_eq!(answer, 42);
    /// # }
    /// ```
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// As [`crate::Client::create`].
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// client.create("/a", b"", synod_client::CreateMode::Persistent)?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::create`].
    pub fn create(&self, path: &str, data: &[u8], mode: CreateMode) -> Result<String> {
        self.block_on(self.client.create(path, data, mode))
    }

    /// As [`crate::Client::get`].
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// let (data, stat) = client.get("/a")?;
    /// # let _ = (data, stat);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::get`].
    pub fn get(&self, path: &str) -> Result<(Vec<u8>, Stat)> {
        self.block_on(self.client.get(path))
    }

    /// As [`crate::Client::set`].
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// client.set("/a", b"new", None)?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::set`].
    pub fn set(&self, path: &str, data: &[u8], expected_version: Option<u64>) -> Result<Stat> {
        self.block_on(self.client.set(path, data, expected_version))
    }

    /// As [`crate::Client::delete`].
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// client.delete("/a", None)?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::delete`].
    pub fn delete(&self, path: &str, expected_version: Option<u64>) -> Result<()> {
        self.block_on(self.client.delete(path, expected_version))
    }

    /// As [`crate::Client::exists`].
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// let there = client.exists("/a")?.is_some();
    /// # let _ = there;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::exists`].
    pub fn exists(&self, path: &str) -> Result<Option<Stat>> {
        self.block_on(self.client.exists(path))
    }

    /// As [`crate::Client::children`].
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// let names = client.children("/")?;
    /// # let _ = names;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::children`].
    pub fn children(&self, path: &str) -> Result<Vec<String>> {
        self.block_on(self.client.children(path))
    }

    /// As [`crate::Client::lock`]: blocks until the lock is held.
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// let guard = client.lock("/locks/a")?;
    /// guard.release()?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::lock`].
    pub fn lock(&self, path: &str) -> Result<LockGuard> {
        let guard = self.block_on(self.client.lock(path))?;
        Ok(LockGuard {
            runtime: self.runtime.clone(),
            guard,
        })
    }

    /// As [`crate::Client::try_lock`].
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) {
    /// if let Ok(guard) = client.try_lock("/locks/a") {
    ///     println!("{}", guard.token().generation);
    /// }
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::try_lock`].
    pub fn try_lock(&self, path: &str) -> Result<LockGuard> {
        let guard = self.block_on(self.client.try_lock(path))?;
        Ok(LockGuard {
            runtime: self.runtime.clone(),
            guard,
        })
    }

    /// As [`crate::Client::lock_timeout`].
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// let guard = client.lock_timeout("/locks/a", std::time::Duration::from_secs(1))?;
    /// # let _ = guard;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::lock_timeout`].
    pub fn lock_timeout(&self, path: &str, timeout: Duration) -> Result<LockGuard> {
        let guard = self.block_on(self.client.lock_timeout(path, timeout))?;
        Ok(LockGuard {
            runtime: self.runtime.clone(),
            guard,
        })
    }

    /// As [`crate::Client::check_sequencer`].
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client, token: &synod_client::Sequencer) -> synod_client::Result<()> {
    /// let current = client.check_sequencer(token)?;
    /// # let _ = current;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::check_sequencer`].
    pub fn check_sequencer(&self, sequencer: &Sequencer) -> Result<bool> {
        self.block_on(self.client.check_sequencer(sequencer))
    }

    /// As [`crate::Client::campaign`]: blocks until this client leads.
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// let leadership = client.campaign("/elections/a", b"me")?;
    /// leadership.resign()?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::campaign`].
    pub fn campaign(&self, name: &str, value: &[u8]) -> Result<LeadershipGuard> {
        let leadership = self.block_on(self.client.campaign(name, value))?;
        Ok(LeadershipGuard {
            runtime: self.runtime.clone(),
            leadership,
        })
    }

    /// As [`crate::Client::leader`].
    ///
    /// ```no_run
    /// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
    /// let leader = client.leader("/elections/a")?;
    /// # let _ = leader;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Client::leader`].
    pub fn leader(&self, name: &str) -> Result<Option<LeaderInfo>> {
        self.block_on(self.client.leader(name))
    }

    /// As [`crate::Client::close`].
    ///
    /// ```no_run
    /// # fn example(client: synod_client::blocking::Client) {
    /// client.close();
    /// # }
    /// ```
    pub fn close(&self) {
        self.block_on(self.client.close());
    }
}

/// A held lock, for the blocking facade; released on drop.
///
/// ```no_run
/// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
/// let guard = client.lock("/locks/a")?;
/// assert!(guard.is_held());
/// drop(guard); // released
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LockGuard {
    runtime: Arc<tokio::runtime::Runtime>,
    guard: crate::LockGuard,
}

impl LockGuard {
    /// As [`crate::LockGuard::token`].
    ///
    /// ```no_run
    /// # fn example(guard: &synod_client::blocking::LockGuard) {
    /// println!("{}", guard.token().generation);
    /// # }
    /// ```
    pub fn token(&self) -> &Sequencer {
        self.guard.token()
    }

    /// As [`crate::LockGuard::is_held`].
    ///
    /// ```no_run
    /// # fn example(guard: &synod_client::blocking::LockGuard) {
    /// assert!(guard.is_held());
    /// # }
    /// ```
    pub fn is_held(&self) -> bool {
        self.guard.is_held()
    }

    /// As [`crate::LockGuard::release`].
    ///
    /// ```no_run
    /// # fn example(guard: synod_client::blocking::LockGuard) -> synod_client::Result<()> {
    /// guard.release()?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::LockGuard::release`].
    pub fn release(self) -> Result<()> {
        let LockGuard { runtime, guard } = self;
        runtime.block_on(guard.release())
    }
}

/// This client's leadership, for the blocking facade; resigned on drop.
///
/// ```no_run
/// # fn example(client: &synod_client::blocking::Client) -> synod_client::Result<()> {
/// let leadership = client.campaign("/elections/a", b"me")?;
/// println!("{}", leadership.token().generation);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LeadershipGuard {
    runtime: Arc<tokio::runtime::Runtime>,
    leadership: crate::Leadership,
}

impl LeadershipGuard {
    /// As [`crate::Leadership::token`].
    ///
    /// ```no_run
    /// # fn example(leadership: &synod_client::blocking::LeadershipGuard) {
    /// println!("{}", leadership.token().generation);
    /// # }
    /// ```
    pub fn token(&self) -> &Sequencer {
        self.leadership.token()
    }

    /// As [`crate::Leadership::is_leader`].
    ///
    /// ```no_run
    /// # fn example(leadership: &synod_client::blocking::LeadershipGuard) {
    /// assert!(leadership.is_leader());
    /// # }
    /// ```
    pub fn is_leader(&self) -> bool {
        self.leadership.is_leader()
    }

    /// As [`crate::Leadership::resign`].
    ///
    /// ```no_run
    /// # fn example(leadership: synod_client::blocking::LeadershipGuard) -> synod_client::Result<()> {
    /// leadership.resign()?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`crate::Leadership::resign`].
    pub fn resign(self) -> Result<()> {
        let LeadershipGuard {
            runtime,
            leadership,
        } = self;
        runtime.block_on(leadership.resign())
    }
}
