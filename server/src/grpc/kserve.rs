//! The Open Inference Protocol (KServe V2) over gRPC:
//! `inference.GRPCInferenceService`, as Triton's and KServe's clients call
//! it. Inputs come as typed `contents` or as `raw_input_contents`; every
//! output is answered in `raw_output_contents`, as Triton does. The work
//! itself is in [`crate::v2`], shared with the REST form.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use fovea_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use fovea_proto::inference::infer_parameter::ParameterChoice;
use fovea_proto::inference::model_infer_response::InferOutputTensor;
use fovea_proto::inference::model_metadata_response::TensorMetadata;
use fovea_proto::inference::{self as pb, InferParameter, InferTensorContents};
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::http::error::ApiError;
use crate::http::AppState;
use crate::v2::infer::{infer, InferRequest, RequestedOutput};
use crate::v2::tensor::{checked_shape, decode_raw, encode_raw, DataType, InputTensor, TensorData};
use crate::v2::{self as protocol, find_model, TensorSpec};

/// The metric label of every gRPC V2 inference.
const INFER_ROUTE: &str = "grpc:/inference.GRPCInferenceService/ModelInfer";

pub struct KServe {
    state: Arc<AppState>,
}

pub fn service(state: Arc<AppState>) -> GrpcInferenceServiceServer<KServe> {
    GrpcInferenceServiceServer::new(KServe { state })
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message)
}

fn tensor_metadata(specs: Vec<TensorSpec>) -> Vec<TensorMetadata> {
    specs
        .into_iter()
        .map(|s| TensorMetadata {
            name: s.name.into(),
            datatype: s.datatype.as_str().into(),
            shape: s.shape,
        })
        .collect()
}

#[tonic::async_trait]
impl GrpcInferenceService for KServe {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let ready = self.state.serving().is_ok();
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let request = request.into_inner();
        find_model(&self.state, &request.name, &request.version)?;
        let ready = self.state.serving().is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: protocol::SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: protocol::EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let model = find_model(&self.state, &request.name, &request.version)?;
        Ok(Response::new(pb::ModelMetadataResponse {
            name: model.name.clone(),
            versions: vec![protocol::MODEL_VERSION.into()],
            platform: protocol::PLATFORM.into(),
            inputs: tensor_metadata(protocol::inputs(&model)),
            outputs: tensor_metadata(protocol::outputs(&model)),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let deadline = super::call_deadline(request.metadata(), Instant::now())?;
        let started = deadline.started;
        let request = request.into_inner();
        let mut label = "unknown".to_string();
        let result = model_infer(&self.state, request, started, deadline.latest, &mut label).await;
        let status = match &result {
            Ok(_) => axum::http::StatusCode::OK,
            Err(e) => {
                tracing::info!(route = INFER_ROUTE, status = e.status.as_u16(), code = e.code, error = %e.message, "request refused");
                e.status
            }
        };
        self.state.record(&label, INFER_ROUTE, status, started);
        Ok(Response::new(result?))
    }
}

async fn model_infer(
    state: &Arc<AppState>,
    request: pb::ModelInferRequest,
    started: Instant,
    deadline: Option<Instant>,
    label: &mut String,
) -> Result<pb::ModelInferResponse, ApiError> {
    state.serving()?;
    let model = find_model(state, &request.model_name, &request.model_version)?;
    label.clone_from(&model.name);
    let id = request.id.clone();
    let infer_request = to_infer_request(request)?;
    let tensors = infer(state, &model, infer_request, started, deadline).await?;
    let mut outputs = Vec::with_capacity(tensors.len());
    let mut raw_output_contents = Vec::with_capacity(tensors.len());
    for t in tensors {
        raw_output_contents.push(encode_raw(&t.data));
        outputs.push(InferOutputTensor {
            name: t.name,
            datatype: t.datatype.as_str().into(),
            shape: t.shape.iter().map(|&d| d as i64).collect(),
            parameters: Default::default(),
            contents: None,
        });
    }
    Ok(pb::ModelInferResponse {
        model_name: model.name.clone(),
        model_version: protocol::MODEL_VERSION.into(),
        id,
        parameters: Default::default(),
        outputs,
        raw_output_contents,
    })
}

/// The wire request as the protocol-neutral one.
fn to_infer_request(request: pb::ModelInferRequest) -> Result<InferRequest, ApiError> {
    let raw = request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(bad(format!(
            "{} raw_input_contents for {} inputs: give one per input, in input order",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (i, input) in request.inputs.into_iter().enumerate() {
        let at = |e: String| bad(format!("input {:?}: {e}", input.name));
        let datatype = DataType::parse(&input.datatype).map_err(at)?;
        let (shape, count) = checked_shape(&input.shape).map_err(at)?;
        if let Some(key) = input.parameters.keys().next() {
            return Err(at(format!("unknown input parameter {key:?}")));
        }
        let data = match raw.get(i) {
            Some(bytes) => {
                if input
                    .contents
                    .is_some_and(|c| c != InferTensorContents::default())
                {
                    return Err(at("both contents and raw_input_contents".into()));
                }
                decode_raw(datatype, count, bytes).map_err(at)?
            }
            None => {
                typed_contents(datatype, count, input.contents.unwrap_or_default()).map_err(at)?
            }
        };
        inputs.push(InputTensor {
            name: input.name,
            datatype,
            shape,
            data,
        });
    }
    let outputs = if request.outputs.is_empty() {
        None
    } else {
        let mut wanted = Vec::with_capacity(request.outputs.len());
        for output in request.outputs {
            let mut classification = None;
            for (key, value) in &output.parameters {
                match (key.as_str(), parameter_value(value)) {
                    ("classification", Value::Number(n)) if n.as_u64().is_some() => {
                        classification = n.as_u64().map(|n| n as usize);
                    }
                    // tritonclient may say so; gRPC outputs are always raw.
                    ("binary_data", Value::Bool(_)) => {}
                    (other, v) => {
                        return Err(bad(format!(
                            "output {:?}: parameter {other:?} = {v} is not understood",
                            output.name
                        )))
                    }
                }
            }
            wanted.push(RequestedOutput {
                name: output.name,
                classification,
            });
        }
        Some(wanted)
    };
    let parameters: BTreeMap<String, Value> = request
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), parameter_value(v)))
        .collect();
    Ok(InferRequest {
        inputs,
        outputs,
        parameters,
    })
}

fn parameter_value(parameter: &InferParameter) -> Value {
    match &parameter.parameter_choice {
        None => Value::Null,
        Some(ParameterChoice::BoolParam(b)) => Value::Bool(*b),
        Some(ParameterChoice::Int64Param(i)) => Value::from(*i),
        Some(ParameterChoice::Uint64Param(u)) => Value::from(*u),
        Some(ParameterChoice::DoubleParam(d)) => Value::from(*d),
        Some(ParameterChoice::StringParam(s)) => Value::String(s.clone()),
    }
}

/// Elements from the typed `contents` field that matches the datatype.
fn typed_contents(
    datatype: DataType,
    count: usize,
    contents: InferTensorContents,
) -> Result<TensorData, String> {
    use DataType::*;
    let data = match datatype {
        Fp32 => TensorData::Fp32(contents.fp32_contents),
        Bytes => TensorData::Bytes(
            contents
                .bytes_contents
                .into_iter()
                .map(Into::into)
                .collect(),
        ),
        Bool => TensorData::Int(contents.bool_contents.into_iter().map(i64::from).collect()),
        Int8 | Int16 | Int32 => {
            TensorData::Int(contents.int_contents.into_iter().map(i64::from).collect())
        }
        Int64 => TensorData::Int(contents.int64_contents),
        Uint8 | Uint16 | Uint32 => {
            TensorData::Int(contents.uint_contents.into_iter().map(i64::from).collect())
        }
        Uint64 => TensorData::Int(
            contents
                .uint64_contents
                .into_iter()
                .map(|u| u.min(i64::MAX as u64) as i64)
                .collect(),
        ),
        Fp16 | Bf16 | Fp64 => {
            return Err(format!(
                "{} data is not supported: send FP32",
                datatype.as_str()
            ))
        }
    };
    if data.len() != count {
        return Err(format!(
            "{} {} elements for {count} in the shape",
            data.len(),
            datatype.as_str()
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fovea_proto::inference::model_infer_request::{
        InferInputTensor, InferRequestedOutputTensor,
    };

    fn input(
        datatype: &str,
        shape: Vec<i64>,
        contents: Option<InferTensorContents>,
    ) -> InferInputTensor {
        InferInputTensor {
            name: "pixel_values".into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents,
        }
    }

    #[test]
    fn raw_and_typed_contents() {
        let raw: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let request = pb::ModelInferRequest {
            inputs: vec![input("FP32", vec![1, 2], None)],
            raw_input_contents: vec![raw],
            ..Default::default()
        };
        let converted = to_infer_request(request).unwrap();
        assert_eq!(converted.inputs[0].data, TensorData::Fp32(vec![1.0, 2.0]));
        assert!(converted.outputs.is_none());

        let typed = InferTensorContents {
            fp32_contents: vec![3.0, 4.0],
            ..Default::default()
        };
        let request = pb::ModelInferRequest {
            inputs: vec![input("FP32", vec![1, 2], Some(typed.clone()))],
            ..Default::default()
        };
        assert_eq!(
            to_infer_request(request).unwrap().inputs[0].data,
            TensorData::Fp32(vec![3.0, 4.0])
        );
        // Too few elements for the shape, a huge shape, wrong raw count.
        for shape in [vec![1, 3], vec![100_000, 3, 4096, 4096]] {
            let request = pb::ModelInferRequest {
                inputs: vec![input("FP32", shape, Some(typed.clone()))],
                ..Default::default()
            };
            assert!(to_infer_request(request).is_err());
        }
        let request = pb::ModelInferRequest {
            inputs: vec![input("FP32", vec![1, 2], None)],
            raw_input_contents: vec![vec![0; 8], vec![0; 8]],
            ..Default::default()
        };
        assert!(to_infer_request(request).is_err());
    }

    #[test]
    fn classification_is_an_output_parameter() {
        let mut parameters = std::collections::HashMap::new();
        parameters.insert(
            "classification".to_string(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(3)),
            },
        );
        let request = pb::ModelInferRequest {
            inputs: vec![input("FP32", vec![1], None)],
            raw_input_contents: vec![vec![0; 4]],
            outputs: vec![InferRequestedOutputTensor {
                name: "logits".into(),
                parameters,
            }],
            ..Default::default()
        };
        let outputs = to_infer_request(request).unwrap().outputs.unwrap();
        assert_eq!(outputs[0].classification, Some(3));
    }
}
