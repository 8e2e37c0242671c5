//! The reconciler: runs the side-effect jobs the `jobs` projection planned, at least once each, and records what
//! happened as commands. Level-triggered: before acting it checks the aggregate, so a job whose decision is already
//! carried out (or overtaken) is simply marked done. Any number of processes may run it: a job is claimed
//! (`FOR UPDATE SKIP LOCKED` on Postgres) for `WHIST_JOB_CLAIM_S` and renewed while it runs; a claim that expires
//! (its process died) is taken again. The attempt number is the claim's fencing token: a process whose claim was
//! taken over can neither renew it nor record the job's outcome.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{watch, Mutex};
use tracing::Instrument;
use whist_adapters::config::CloudKind;
use whist_adapters::ec2::{Ec2Error, LaunchRequest};
use whist_adapters::host_client::{HostClient, HostEndpoint, SpinUp};
use whist_adapters::simulated_host::{self, SimulatedHost, SimulatedHostSpec};
use whist_adapters::store::{CommandError, GATHER_WINDOW};

use crate::workers::job_outcomes::{JobOutcome, OutcomeError, OutcomeWriter};
use whist_adapters::tokens::Purpose;
use whist_domain::instance::{
    Instance, InstanceCommand, InstanceStatus, LaunchSpec, TerminationReason,
};
use whist_domain::mandelbox::{EndReason, MandelboxCommand, MandelboxStatus};
use whist_domain::{Actor, EventMetadata};
use whist_projections::jobs::{Job, JobKind};

use crate::state::Context;

/// Attempts before a job is given up (except the kinds `retries_until_done` names).
const MAX_ATTEMPTS: i64 = 6;
/// The longest wait between two attempts of a job.
const MAX_BACKOFF_MS: i64 = 15_000;
/// Jobs one process runs at once.
const IN_FLIGHT: usize = 64;
/// While jobs are waiting, the reconciler claims again once this many slots are free: one claim per job freed
/// would read the waiting jobs once per job.
const REFILL: usize = IN_FLIGHT / 4;

/// Whether a job of `kind` keeps being retried, however many attempts fail for reasons worth retrying: a launch or
/// a termination that was decided stands until the cloud carries it out or refuses it (an EC2 outage of any length
/// must not leave a decision that nobody carries out; a launch given up would be counted as a booting host until
/// the registration timeout). A launch that can never be carried out is ended by that timeout (the sweeper), which
/// makes its job a no-op. Spin-ups and drains give up: a host that cannot be reached is left to the timeouts.
fn retries_until_done(kind: JobKind) -> bool {
    matches!(
        kind,
        JobKind::Launch | JobKind::Terminate | JobKind::TerminateStray
    )
}

/// The metadata of what a job's outcome records: the chain of the decision that planned the job, caused by the
/// event that planned it (a job planned before jobs remembered these starts a chain of its own).
fn outcome_metadata(job: &Job) -> EventMetadata {
    // In the job's span, its own trace context; else the planning decision's.
    let traceparent =
        whist_adapters::trace_context::current_traceparent().or_else(|| job.traceparent.clone());
    let mut metadata = EventMetadata::new(Actor::System, Utc::now()).in_trace(traceparent);
    if let Some(correlation_id) = &job.correlation_id {
        metadata.correlation_id = correlation_id.clone();
    }
    // A job that does not know the event that planned it is the root's own step.
    metadata.causation_id = Some(match job.planned_by {
        Some(position) => position.to_string(),
        None => metadata.correlation_id.clone(),
    });
    metadata
}

/// What running a job came to.
enum Outcome {
    Done,
    Retry(String),
    GiveUp(String),
}

/// Runs jobs until shut down.
#[derive(Clone)]
pub struct Reconciler {
    state: Context,
    hosts: HostClient,
    simulated: Arc<Mutex<HashMap<String, SimulatedHost>>>,
}

impl Reconciler {
    pub fn new(state: Context) -> Self {
        let hosts = HostClient::new(
            state.settings.host_trust(),
            state.settings.host_service_port,
            state.settings.host_network_cidrs.clone(),
        );
        Self {
            state,
            hosts,
            simulated: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Kinds this process runs: launching goes to simulated hosts (`local`) or EC2 (`aws`).
    fn kinds(&self) -> &'static [JobKind] {
        &JobKind::ALL
    }

    fn claim_ms(&self) -> i64 {
        i64::try_from(self.state.settings.fleet.job_claim.as_millis()).unwrap_or(60_000)
    }

    /// Claims up to `limit` runnable jobs.
    async fn claim(&self, limit: i64) -> Result<Vec<Job>, sqlx::Error> {
        let now = Utc::now().timestamp_millis();
        whist_projections::jobs::claim(
            &self.state.database,
            self.kinds(),
            now,
            now + self.claim_ms(),
            limit,
        )
        .await
    }

    async fn finish(
        &self,
        job: &Job,
        outcome: Outcome,
        outcomes: &OutcomeWriter,
    ) -> Result<(), OutcomeError> {
        let now = Utc::now().timestamp_millis();
        let (status, run_after, error) = match outcome {
            Outcome::Done => ("done", now, None),
            Outcome::Retry(error)
                if job.attempts < MAX_ATTEMPTS || job.kind.is_some_and(retries_until_done) =>
            {
                let backoff = (250i64 << job.attempts.clamp(0, 8)).min(MAX_BACKOFF_MS);
                ("pending", now + backoff, Some(error))
            }
            Outcome::Retry(error) | Outcome::GiveUp(error) => ("failed", now, Some(error)),
        };
        if let Some(error) = &error {
            tracing::warn!(
                job = job.id,
                kind = job.kind_name,
                aggregate_id = job.aggregate_id,
                error,
                status,
                "job did not complete"
            );
        }
        let recorded = outcomes
            .record(JobOutcome {
                id: job.id,
                attempts: job.attempts,
                status,
                run_after_ms: run_after,
                error,
            })
            .await?;
        if !recorded {
            // Another process took the job over (this claim expired); its outcome is that process's to record.
            tracing::warn!(
                job = job.id,
                kind = job.kind_name,
                "job was taken over; outcome left to its new claimant"
            );
            return Ok(());
        }
        if status == "failed" && job.kind == Some(JobKind::SpinUp) {
            self.abandon_mandelbox(&job.aggregate_id, &outcome_metadata(job))
                .await;
        }
        let kind = job.kind.map_or("unknown", JobKind::as_str);
        metrics::counter!("whist_jobs_total", "kind" => kind, "status" => status).increment(1);
        Ok(())
    }

    /// Runs `job` in a span of its own that continues the trace of the decision that planned it.
    async fn run_job(&self, job: &Job) -> Outcome {
        let span = tracing::info_span!("job", job = job.id, kind = %job.kind_name,
            aggregate_id = %job.aggregate_id, attempt = job.attempts);
        whist_adapters::trace_context::continue_trace(&span, job.traceparent.as_deref(), None);
        self.run_job_in_span(job).instrument(span).await
    }

    async fn run_job_in_span(&self, job: &Job) -> Outcome {
        let chain = &outcome_metadata(job);
        match job.kind {
            Some(JobKind::SpinUp) => self.spin_up(&job.aggregate_id, chain).await,
            Some(JobKind::Launch) => match self.state.settings.cloud {
                CloudKind::Local => self.launch_simulated(&job.aggregate_id, chain).await,
                CloudKind::Aws => self.launch_ec2(&job.aggregate_id, chain).await,
            },
            Some(JobKind::Drain) => self.drain(&job.aggregate_id).await,
            Some(JobKind::Terminate) => self.terminate(&job.aggregate_id, chain).await,
            Some(JobKind::TerminateStray) => self.terminate_stray(job).await,
            None => Outcome::GiveUp(format!("unknown job kind {}", job.kind_name)),
        }
    }

    async fn spin_up(&self, mandelbox_id: &str, chain: &EventMetadata) -> Outcome {
        let services = &self.state.services;
        // As of the log: the remembered copy (usually this process's, from the assign), brought up to date when the
        // log follower saw it change. (The check and the host's call were never one step: an end recorded after
        // the check, or up to `FOLLOW_LAG_BOUND` before it, meets a mandelbox being started, as one recorded during
        // the call always could.)
        let mandelbox = match services.mandelboxes.load_as_of_log(mandelbox_id).await {
            Ok((mandelbox, _)) => mandelbox,
            Err(error) => return Outcome::Retry(error.to_string()),
        };
        let (Some(MandelboxStatus::Allocated), Some(placement), None) =
            (mandelbox.status, mandelbox.placement, mandelbox.spun_up_at)
        else {
            // Already started, or ended: nothing to do.
            return Outcome::Done;
        };
        let body = SpinUp {
            mandelbox_id: mandelbox_id.to_string(),
            session_id: placement.session_id,
            user_id: placement.user_id.clone(),
            app_name: placement.app_name.clone(),
            protocol_secret: services.tokens.derive(Purpose::Protocol, mandelbox_id),
        };
        let token = services
            .tokens
            .derive(Purpose::HostAuth, &placement.instance_id);
        // The host's certificate fingerprint, as it registered it (the placement carries only the address), as of
        // the log: should the host have registered again with another certificate within `FOLLOW_LAG_BOUND`, the
        // pinned call fails and the job is retried on the copy the follower has marked by then.
        let host = match services
            .instances
            .load_as_of_log(&placement.instance_id)
            .await
        {
            Ok((host, _)) => host,
            Err(error) => return Outcome::Retry(error.to_string()),
        };
        let endpoint = HostEndpoint {
            ip: &placement.ip,
            tls_cert_sha256: host.tls_cert_sha256.as_deref(),
        };
        if let Err(error) = self.hosts.spin_up(endpoint, &token, &body).await {
            return Outcome::Retry(error.to_string());
        }
        let metadata = chain.at(Utc::now());
        match services
            .mandelboxes
            .execute_retrying(
                mandelbox_id,
                MandelboxCommand::RecordSpunUp { at: Utc::now() },
                &metadata,
            )
            .await
        {
            Ok(()) => Outcome::Done,
            // The host has it; a failed record only means a repeat call, which the host takes idempotently.
            Err(error) => Outcome::Retry(error.to_string()),
        }
    }

    /// Ends a mandelbox whose host never took it.
    async fn abandon_mandelbox(&self, mandelbox_id: &str, chain: &EventMetadata) {
        let services = &self.state.services;
        let Ok((mandelbox, _)) = services.mandelboxes.load_from_history(mandelbox_id).await else {
            return;
        };
        let Some(placement) = mandelbox.placement else {
            return;
        };
        let metadata = chain.at(Utc::now());
        if let Err(error) = services
            .mandelboxes
            .execute_retrying(
                mandelbox_id,
                MandelboxCommand::End {
                    reason: EndReason::SpinUpFailed,
                    at: Utc::now(),
                },
                &metadata,
            )
            .await
        {
            tracing::warn!(mandelbox_id, error = %error, "could not end an abandoned mandelbox");
            return;
        }
        if let Err(error) = crate::control::mandelboxes::end_mandelbox(
            &self.state,
            mandelbox_id,
            &placement,
            &metadata,
        )
        .await
        {
            tracing::warn!(
                mandelbox_id,
                error = %crate::telemetry::Chain(&error),
                "could not free an abandoned mandelbox's slot"
            );
        }
    }

    /// The launch spec of a decision still waiting for its cloud instance; `None` when there is nothing to launch.
    async fn awaiting_launch(&self, instance_id: &str) -> Result<Option<LaunchSpec>, Outcome> {
        let (instance, _) = self
            .state
            .services
            .instances
            .load_from_history(instance_id)
            .await
            .map_err(|error| Outcome::Retry(error.to_string()))?;
        Ok(
            match (instance.status, instance.spec, instance.cloud_instance_id) {
                (Some(InstanceStatus::PreConnection), Some(spec), None) => Some(spec),
                _ => None,
            },
        )
    }

    /// Launches the host of one launch decision on EC2, at least once and never twice: a retry (after a crash
    /// between the call and its record, say) adopts the instance tagged with this launch instead of starting another.
    async fn launch_ec2(&self, instance_id: &str, chain: &EventMetadata) -> Outcome {
        let services = &self.state.services;
        let Some(ec2) = &services.ec2 else {
            return Outcome::GiveUp("EC2 is not configured in this process".to_string());
        };
        let spec = match self.awaiting_launch(instance_id).await {
            Ok(Some(spec)) => spec,
            Ok(None) => return Outcome::Done,
            Err(outcome) => return outcome,
        };
        let user_data = format!(
            "WHIST_BOOTSTRAP_TOKEN={}\nWHIST_INSTANCE_ID={instance_id}\nWHIST_WEBSERVER_URL={}\n",
            services.tokens.derive(Purpose::Bootstrap, instance_id),
            self.state.settings.public_url,
        );
        let request = LaunchRequest {
            launch_id: instance_id.to_string(),
            region: spec.region.clone(),
            image_id: spec.image_id.clone(),
            instance_type: spec.instance_type.clone(),
            user_data,
        };
        let metadata = chain.at(Utc::now());
        let launched = ec2.launch(&request).await;
        let pause = self.state.settings.fleet.fault_pause_after_launch;
        if !pause.is_zero() {
            tracing::warn!(
                instance_id,
                outcome = ?launched.as_ref().map(|launched| &launched.cloud_instance_id),
                pause_ms = pause.as_millis(),
                "launch call returned; pausing before recording it (WHIST_FAULT_PAUSE_AFTER_LAUNCH_MS)"
            );
            tokio::time::sleep(pause).await;
        }
        let command = match launched {
            Ok(launched) => InstanceCommand::RecordLaunch {
                cloud_instance_id: launched.cloud_instance_id,
                at: Utc::now(),
            },
            Err(Ec2Error::Retryable(error)) => return Outcome::Retry(error),
            Err(Ec2Error::Refused(reason)) => InstanceCommand::RecordLaunchFailure {
                reason,
                at: Utc::now(),
            },
        };
        match services
            .instances
            .execute_retrying(instance_id, command, &metadata)
            .await
        {
            Ok(()) | Err(CommandError::Rejected(_)) => Outcome::Done,
            Err(error) => Outcome::Retry(error.to_string()),
        }
    }

    async fn launch_simulated(&self, instance_id: &str, chain: &EventMetadata) -> Outcome {
        let services = &self.state.services;
        let spec = match self.awaiting_launch(instance_id).await {
            Ok(Some(spec)) => spec,
            Ok(None) => return Outcome::Done,
            Err(outcome) => return outcome,
        };
        let host = match simulated_host::start(SimulatedHostSpec {
            instance_id: instance_id.to_string(),
            bootstrap_token: services.tokens.derive(Purpose::Bootstrap, instance_id),
            webserver_url: self.state.settings.public_url.clone(),
            region: spec.region,
            image_id: spec.image_id,
            instance_type: spec.instance_type,
            client_commit_hash: spec.client_commit_hash,
            mandelbox_capacity: self.state.settings.fleet.host_capacity,
            port: self.state.settings.host_service_port,
            tls: self.state.settings.simulated_host_tls(),
        })
        .await
        {
            Ok(host) => host,
            Err(error) => return Outcome::Retry(error.to_string()),
        };
        let cloud_instance_id = format!("sim-{}", host.ip);
        self.simulated
            .lock()
            .await
            .insert(instance_id.to_string(), host);
        let metadata = chain.at(Utc::now());
        match services
            .instances
            .execute_retrying(
                instance_id,
                InstanceCommand::RecordLaunch {
                    cloud_instance_id,
                    at: Utc::now(),
                },
                &metadata,
            )
            .await
        {
            Ok(()) => Outcome::Done,
            Err(error) => Outcome::Retry(error.to_string()),
        }
    }

    async fn load_instance(&self, instance_id: &str) -> Result<Instance, Outcome> {
        self.state
            .services
            .instances
            .load_caught_up(instance_id)
            .await
            .map(|(instance, _)| instance)
            .map_err(|error| Outcome::Retry(error.to_string()))
    }

    /// Asks a draining host to drain and shut down. A host that does not answer is left to the timeouts: silent,
    /// it becomes unresponsive; empty for `WHIST_DRAINED_HOST_TIMEOUT_S`, it is terminated.
    async fn drain(&self, instance_id: &str) -> Outcome {
        let instance = match self.load_instance(instance_id).await {
            Ok(instance) => instance,
            Err(outcome) => return outcome,
        };
        let (Some(InstanceStatus::Draining), Some(ip)) = (instance.status, instance.ip) else {
            // Not draining any more, or never registered (nothing to ask).
            return Outcome::Done;
        };
        let token = self
            .state
            .services
            .tokens
            .derive(Purpose::HostAuth, instance_id);
        let endpoint = HostEndpoint {
            ip: &ip,
            tls_cert_sha256: instance.tls_cert_sha256.as_deref(),
        };
        match self.hosts.drain_and_shutdown(endpoint, &token).await {
            Ok(()) => Outcome::Done,
            Err(error) => Outcome::Retry(error.to_string()),
        }
    }

    /// Ends a host whose termination was decided: in the cloud (EC2, or the simulated host of this process), then
    /// records it gone and ends any mandelbox still recorded on it.
    async fn terminate(&self, instance_id: &str, chain: &EventMetadata) -> Outcome {
        let instance = match self.load_instance(instance_id).await {
            Ok(instance) => instance,
            Err(outcome) => return outcome,
        };
        if instance.status != Some(InstanceStatus::Terminating) {
            return Outcome::Done;
        }
        // A developer's termination goes through the host service first, when there is one to ask; the cloud
        // call below ends the machine whether or not it answered.
        if let (Some(TerminationReason::Operator), Some(ip)) =
            (instance.termination_reason, instance.ip.as_deref())
        {
            let token = self
                .state
                .services
                .tokens
                .derive(Purpose::HostAuth, instance_id);
            let endpoint = HostEndpoint {
                ip,
                tls_cert_sha256: instance.tls_cert_sha256.as_deref(),
            };
            if let Err(error) = self.hosts.drain_and_shutdown(endpoint, &token).await {
                tracing::info!(instance_id, error = %error, "the host did not take its shutdown; ending it in the cloud");
            }
        }
        match self.state.settings.cloud {
            CloudKind::Local => {
                if let Some(host) = self.simulated.lock().await.remove(instance_id) {
                    host.stop();
                }
            }
            CloudKind::Aws => {
                let Some(ec2) = &self.state.services.ec2 else {
                    return Outcome::GiveUp("EC2 is not configured in this process".to_string());
                };
                let Some(spec) = &instance.spec else {
                    return Outcome::Done;
                };
                // The launch may have happened without being recorded (a crash in between): find it by its tag.
                let cloud_instance_id = match &instance.cloud_instance_id {
                    Some(known) => Some(known.clone()),
                    None => match ec2.find_launch(&spec.region, instance_id).await {
                        Ok(found) => found.map(|found| found.cloud_instance_id),
                        Err(error) => return Outcome::Retry(error.to_string()),
                    },
                };
                if let Some(cloud_instance_id) = cloud_instance_id {
                    if let Err(error) = ec2
                        .terminate(&spec.region, std::slice::from_ref(&cloud_instance_id))
                        .await
                    {
                        return Outcome::Retry(error.to_string());
                    }
                }
            }
        }
        let metadata = chain.at(Utc::now());
        if let Err(error) = self
            .state
            .services
            .instances
            .execute_retrying(
                instance_id,
                InstanceCommand::RecordTerminated { at: Utc::now() },
                &metadata,
            )
            .await
        {
            return Outcome::Retry(error.to_string());
        }
        match crate::control::mandelboxes::end_mandelboxes_on(
            &self.state,
            instance_id,
            EndReason::HostLost,
            &metadata,
        )
        .await
        {
            Ok(_) => Outcome::Done,
            Err(error) => Outcome::Retry(crate::telemetry::Chain(&error).to_string()),
        }
    }

    /// Terminates a cloud instance that is no live host's (the decision is recorded in the payload's event).
    async fn terminate_stray(&self, job: &Job) -> Outcome {
        let (Some(region), Some(cloud_instance_id)) = (
            job.payload.region.as_deref(),
            job.payload.cloud_instance_id.as_deref(),
        ) else {
            return Outcome::GiveUp("a stray job without region or instance".to_string());
        };
        let Some(ec2) = &self.state.services.ec2 else {
            return Outcome::GiveUp("EC2 is not configured in this process".to_string());
        };
        match ec2
            .terminate(region, &[cloud_instance_id.to_string()])
            .await
        {
            Ok(()) => Outcome::Done,
            Err(error) => Outcome::Retry(error.to_string()),
        }
    }

    /// Runs one claimed job, renewing its claim every third of the claim time while it runs.
    async fn run_claimed(&self, job: &Job) -> Outcome {
        let claim_ms = self.claim_ms();
        let renew_every =
            Duration::from_millis(u64::try_from(claim_ms / 3).unwrap_or(1000).max(100));
        let work = self.run_job(job);
        tokio::pin!(work);
        loop {
            tokio::select! {
                outcome = &mut work => return outcome,
                _ = tokio::time::sleep(renew_every) => {
                    let until = Utc::now().timestamp_millis() + claim_ms;
                    let renewed = whist_projections::jobs::renew_claim(
                        &self.state.database,
                        job.id,
                        job.attempts,
                        until,
                    )
                    .await;
                    if let Err(error) = renewed {
                        tracing::warn!(job = job.id, error = %error, "could not renew a job's claim");
                    }
                }
            }
        }
    }

    /// Runs jobs until `shutdown`, waking when jobs were planned (here or in another process) and at least every
    /// 500 ms (for retries that came due and claims that expired).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut planned = self.state.database.jobs_signal().on_planned();
        // Up to `IN_FLIGHT` jobs run at once, each in its own task, so one slow side effect never holds up the
        // others; freed slots are filled by the next claim (at once when idle, `REFILL` at a time under a backlog).
        let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let outcomes = OutcomeWriter::start(self.state.database.clone());
        let finished = Arc::new(tokio::sync::Notify::new());
        // Whether the last claim found as many jobs as it asked for.
        let mut backlog = false;
        loop {
            if whist_adapters::supervision::stopping(&shutdown) {
                // Let the jobs in flight finish and record their outcome.
                let _ = slots.acquire_many(IN_FLIGHT as u32).await;
                let hosts = self.simulated.lock().await;
                for host in hosts.values() {
                    host.stop();
                }
                return;
            }
            if !outcomes.is_running() {
                // Every outcome from now on would be lost (each job would run again once its claim expired): end,
                // so that the supervisor restarts the reconciler with a writer of its own.
                tracing::error!("the job outcome writer stopped; the reconciler stops with it");
                return;
            }
            planned.borrow_and_update();
            let room = slots.available_permits();
            if room >= REFILL || (room > 0 && !backlog) {
                match self.claim(room as i64).await {
                    Ok(jobs) if !jobs.is_empty() => {
                        // A full claim means more are likely waiting: claim again as slots free up, without
                        // waiting for the log to move.
                        backlog = jobs.len() == room;
                        for job in jobs {
                            let Ok(permit) = slots.clone().try_acquire_owned() else {
                                break;
                            };
                            let reconciler = self.clone();
                            let finished = finished.clone();
                            let outcomes = outcomes.clone();
                            tokio::spawn(async move {
                                let outcome = reconciler.run_claimed(&job).await;
                                if let Err(error) =
                                    reconciler.finish(&job, outcome, &outcomes).await
                                {
                                    tracing::warn!(job = job.id, error = %error, "could not record a job's outcome");
                                }
                                drop(permit);
                                finished.notify_one();
                            });
                        }
                        continue;
                    }
                    Ok(_) => backlog = false,
                    Err(error) => tracing::warn!(error = %error, "could not claim jobs"),
                }
            }
            tokio::select! {
                // Caught up: new jobs come from the planner; gather a few milliseconds of its commits into one claim.
                _ = planned.changed(), if !backlog => tokio::time::sleep(GATHER_WINDOW).await,
                _ = finished.notified(), if room < IN_FLIGHT => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
