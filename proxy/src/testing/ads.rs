//! A scripted delta ADS server for the gateway's xDS client: the test decides each response, and reads every
//! request the gateway sends (subscriptions, ACKs, NACKs) in order. Served over real gRPC on 127.0.0.1.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type Responses = mpsc::UnboundedReceiver<Result<DeltaDiscoveryResponse, Status>>;

struct Service {
    requests: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    /// The responses of the next stream (one stream at a time).
    responses: Mutex<Option<Responses>>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send + 'static>>;
    type DeltaAggregatedResourcesStream = UnboundedReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("the scripted server speaks delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let responses = self.responses.lock().unwrap().take().ok_or_else(|| Status::unavailable("one stream only"))?;
        let mut incoming = request.into_inner();
        let requests = self.requests.clone();
        tokio::spawn(async move {
            while let Ok(Some(request)) = incoming.message().await {
                if requests.send(request).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(UnboundedReceiverStream::new(responses)))
    }
}

/// The server, and the test's end of its one stream.
pub struct ScriptedAds {
    pub address: SocketAddr,
    requests: mpsc::UnboundedReceiver<DeltaDiscoveryRequest>,
    responses: mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>,
    nonce: u64,
}

impl std::fmt::Debug for ScriptedAds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedAds").field("address", &self.address).finish_non_exhaustive()
    }
}

impl ScriptedAds {
    pub async fn start() -> ScriptedAds {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("bound");
        let (requests_tx, requests) = mpsc::unbounded_channel();
        let (responses, responses_rx) = mpsc::unbounded_channel();
        let service = Service { requests: requests_tx, responses: Mutex::new(Some(responses_rx)) };
        let server = AggregatedDiscoveryServiceServer::new(service);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        ScriptedAds { address, requests, responses, nonce: 0 }
    }

    /// The gateway's `--xds` URL for this server.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The next request the gateway sends; panics after 10 s.
    pub async fn request(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("a request within 10 s")
            .expect("the stream is open")
    }

    /// The next request of `type_url`, skipping others.
    pub async fn request_of<M: Name>(&mut self) -> DeltaDiscoveryRequest {
        loop {
            let request = self.request().await;
            if request.type_url == M::type_url() {
                return request;
            }
        }
    }

    /// Sends `resources` (name, version, message) and `removed` names of one type; returns the nonce.
    pub fn push<M: Message + Name>(&mut self, resources: &[(&str, &str, &M)], removed: &[&str]) -> String {
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let response = DeltaDiscoveryResponse {
            type_url: M::type_url(),
            nonce: nonce.clone(),
            resources: resources
                .iter()
                .map(|(name, version, message)| Resource {
                    name: (*name).to_owned(),
                    version: (*version).to_owned(),
                    resource: Some(Any { type_url: M::type_url(), value: message.encode_to_vec() }),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed.iter().map(|n| (*n).to_owned()).collect(),
            ..Default::default()
        };
        self.responses.send(Ok(response)).expect("the stream is open");
        nonce
    }

    /// Sends a raw response (e.g. one that does not decode); returns its nonce.
    pub fn push_raw(&mut self, mut response: DeltaDiscoveryResponse) -> String {
        self.nonce += 1;
        response.nonce = self.nonce.to_string();
        self.responses.send(Ok(response)).expect("the stream is open");
        self.nonce.to_string()
    }

    /// Waits for the answer to `nonce`: `Ok` for an ACK, `Err(message)` for a NACK.
    pub async fn answer(&mut self, nonce: &str) -> Result<(), String> {
        loop {
            let request = self.request().await;
            if request.response_nonce == nonce {
                return match request.error_detail {
                    None => Ok(()),
                    Some(status) => Err(status.message),
                };
            }
        }
    }
}
