//! The gRPC services: each call becomes a command for the datapath task, and
//! its errors become the status codes clients can act on.

use std::{future::Future, pin::Pin, time::Duration};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::{
    Stream, StreamExt, wrappers::BroadcastStream, wrappers::errors::BroadcastStreamRecvError,
};
use tollgate_advisor::{recording::Recording, replay};
use tollgate_proto::v1::{
    self as api, agent_service_server::AgentService, flow_service_server::FlowService,
    policy_service_server::PolicyService,
};
use tonic::{Code, Request, Response, Status};
use tracing::debug;

use super::{
    controller::{Command, ControlError},
    flows::{Filter, FlowSubscriptions, InvalidFilter},
    store::StoreError,
};
use crate::{
    datapath::{DatapathError, RuleSetError},
    enforce::EnforceError,
    log_level::{LogLevel, LogLevelError},
    telemetry::GrpcCalls,
};

#[derive(Clone)]
pub struct Api {
    commands: mpsc::Sender<Command>,
    flows: FlowSubscriptions,
    log_level: LogLevel,
    calls: GrpcCalls,
}

impl Api {
    pub fn new(
        commands: mpsc::Sender<Command>,
        flows: FlowSubscriptions,
        log_level: LogLevel,
        calls: GrpcCalls,
    ) -> Self {
        Self {
            commands,
            flows,
            log_level,
            calls,
        }
    }

    /// Runs one call, counting it by method and status code.
    async fn observed<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let result = call.await;
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.calls.count(method, code);
        debug!(method, ?code, "control API call");
        result
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Status> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| Status::unavailable("the agent is stopping"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the agent is stopping"))
    }
}

fn status(error: ControlError) -> Status {
    let message = error.to_string();
    match error {
        ControlError::Store(StoreError::Invalid(_) | StoreError::InvalidMode(_)) => {
            Status::invalid_argument(message)
        }
        ControlError::Store(
            StoreError::GenerationMismatch { .. } | StoreError::ClusterOwned { .. },
        ) => Status::failed_precondition(message),
        ControlError::Store(StoreError::UnknownPolicy(_)) => Status::not_found(message),
        ControlError::Enforce(EnforceError::Compile(_))
        | ControlError::Enforce(EnforceError::Datapath(DatapathError::Rules(
            RuleSetError::Capacity { .. },
        ))) => Status::resource_exhausted(message),
        _ => Status::internal(message),
    }
}

#[tonic::async_trait]
impl PolicyService for Api {
    async fn apply_policies(
        &self,
        request: Request<api::ApplyPoliciesRequest>,
    ) -> Result<Response<api::PolicyChanges>, Status> {
        self.observed("ApplyPolicies", async {
            let request = request.into_inner();
            self.ask(|reply| Command::Apply(request, reply))
                .await?
                .map(Response::new)
                .map_err(status)
        })
        .await
    }

    async fn delete_policies(
        &self,
        request: Request<api::DeletePoliciesRequest>,
    ) -> Result<Response<api::PolicyChanges>, Status> {
        self.observed("DeletePolicies", async {
            let request = request.into_inner();
            self.ask(|reply| Command::Delete(request, reply))
                .await?
                .map(Response::new)
                .map_err(status)
        })
        .await
    }

    async fn list_policies(
        &self,
        _: Request<api::ListPoliciesRequest>,
    ) -> Result<Response<api::ListPoliciesResponse>, Status> {
        self.observed("ListPolicies", async {
            self.ask(Command::List).await.map(Response::new)
        })
        .await
    }

    async fn get_mode(
        &self,
        _: Request<api::GetModeRequest>,
    ) -> Result<Response<api::ModeSettings>, Status> {
        self.observed("GetMode", async {
            self.ask(Command::GetMode).await.map(Response::new)
        })
        .await
    }

    async fn set_mode(
        &self,
        request: Request<api::SetModeRequest>,
    ) -> Result<Response<api::ModeSettings>, Status> {
        self.observed("SetMode", async {
            let request = request.into_inner();
            self.ask(|reply| Command::SetMode(request, reply))
                .await?
                .map(Response::new)
                .map_err(status)
        })
        .await
    }
}

fn log_level_status(error: LogLevelError) -> Status {
    match error {
        LogLevelError::Invalid { .. } => Status::invalid_argument(error.to_string()),
        LogLevelError::Gone => Status::internal(error.to_string()),
    }
}

#[tonic::async_trait]
impl AgentService for Api {
    async fn get_log_level(
        &self,
        _: Request<api::GetLogLevelRequest>,
    ) -> Result<Response<api::LogLevel>, Status> {
        self.observed("GetLogLevel", async {
            Ok(Response::new(api::LogLevel {
                filter: self.log_level.get(),
            }))
        })
        .await
    }

    async fn set_log_level(
        &self,
        request: Request<api::LogLevel>,
    ) -> Result<Response<api::LogLevel>, Status> {
        self.observed("SetLogLevel", async {
            let filter = request.into_inner().filter;
            self.log_level.set(&filter).map_err(log_level_status)?;
            tracing::info!(filter, "log level changed");
            Ok(Response::new(api::LogLevel { filter }))
        })
        .await
    }

    async fn list_rule_stats(
        &self,
        request: Request<api::ListRuleStatsRequest>,
    ) -> Result<Response<api::ListRuleStatsResponse>, Status> {
        self.observed("ListRuleStats", async {
            let request = request.into_inner();
            self.ask(|reply| Command::RuleStats(request, reply))
                .await?
                .map(Response::new)
                .map_err(status)
        })
        .await
    }

    async fn status(
        &self,
        _: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusResponse>, Status> {
        self.observed("Status", async {
            self.ask(Command::Status)
                .await?
                .map(Response::new)
                .map_err(status)
        })
        .await
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<api::Flow, Status>> + Send>>;

#[tonic::async_trait]
impl FlowService for Api {
    type StreamFlowsStream = FlowStream;

    async fn stream_flows(
        &self,
        request: Request<api::FlowFilter>,
    ) -> Result<Response<FlowStream>, Status> {
        self.observed("StreamFlows", async {
            let request = request.into_inner();
            let filter = Filter::new(&request)
                .map_err(|InvalidFilter(message)| Status::invalid_argument(message))?;
            let (past, live) = self
                .flows
                .subscribe(Duration::from_secs(u64::from(request.since_seconds)));
            let past: Vec<_> = past
                .into_iter()
                .filter(|f| filter.matches(f))
                .map(|f| Ok((*f).clone()))
                .collect();
            let past = tokio_stream::iter(past);
            // Without follow, or when the agent is stopping, the past is all.
            let Some(live) = live.filter(|_| request.follow) else {
                return Ok(Response::new(Box::pin(past) as FlowStream));
            };
            // Ends when the agent stops publishing (the hub is dropped).
            let live = BroadcastStream::new(live).filter_map(move |item| match item {
                Ok(flow) => filter.matches(&flow).then(|| Ok((*flow).clone())),
                Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Err(Status::data_loss(
                    format!("this subscriber fell {missed} records behind; the stream ends here"),
                ))),
            });
            Ok(Response::new(Box::pin(past.chain(live)) as FlowStream))
        })
        .await
    }

    async fn dry_run(
        &self,
        request: Request<api::DryRunRequest>,
    ) -> Result<Response<api::DryRunReport>, Status> {
        self.observed("DryRun", async {
            let request = request.into_inner();
            let in_force = if request.beside {
                self.ask(Command::List).await?.policies
            } else {
                Vec::new()
            };
            let policies =
                replay::candidate_set(&in_force, &request.policies).map_err(|errors| {
                    Status::invalid_argument(tollgate_policy::document::describe(&errors))
                })?;
            let (recent, _) = self
                .flows
                .subscribe(Duration::from_secs(u64::from(request.since_seconds)));
            let mut recording = Recording::default();
            recording
                .add_api_flows(recent.iter().map(|flow| &**flow))
                .map_err(|e| Status::internal(format!("a recent flow record: {e}")))?;
            let report = replay::replay(&recording, &policies);
            Ok(Response::new(replay::to_api(&report)))
        })
        .await
    }
}
