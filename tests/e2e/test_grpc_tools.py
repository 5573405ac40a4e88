"""What generic gRPC tools do against the running stack, as the README's grpcurl examples show:
health checking with no token, listing and describing the services through reflection, and one
call with a token, built from reflection alone (no generated code, as grpcurl works). Where
grpcurl is installed, the README's commands themselves run too; the README's `buf curl` commands
always run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from clients.stack import LocalStack

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def call(channel: grpc.Channel, pool: descriptor_pool.DescriptorPool, method: str, token: str | None) -> object:
    """`method` ("package.Service/Method") with an empty request, typed from reflection only."""
    service_name, method_name = method.split("/")
    described = pool.FindServiceByName(service_name).FindMethodByName(method_name)
    request, response = (message_factory.GetMessageClass(t) for t in (described.input_type, described.output_type))
    stub = channel.unary_unary(f"/{method}", request_serializer=request.SerializeToString,
                               response_deserializer=response.FromString)
    return stub(request(), timeout=10, metadata=(("authorization", f"Bearer {token}"),) if token else None)


def test_health_reflection_and_a_call_with_a_token_need_nothing_but_the_wire(stack: LocalStack) -> None:
    address = stack.pipeline_address.split(",")[0]
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"segtrain.pipeline.v1.PipelineService", "grpc.health.v1.Health"} <= services, services
        pool = descriptor_pool.DescriptorPool(database)
        health = call(channel, pool, "grpc.health.v1.Health/Check", None)
        assert str(health).strip() == "status: SERVING"
        with pytest.raises(grpc.RpcError) as refused:
            call(channel, pool, "segtrain.pipeline.v1.PipelineService/ListPipelines", None)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listed = call(channel, pool, "segtrain.pipeline.v1.PipelineService/ListPipelines", stack.tokens["viewer"])
        assert "pipelines/segmentation" in str(listed)


def readme_lines(tool: str) -> list[str]:
    """The README's `tool` commands of its grpcurl section, for the running stack's first replica."""
    section = README.read_text().split("### grpcurl", 1)[1].split("\n## ", 1)[0]
    lines = [line for block in section.split("```sh")[1:] for line in block.split("```", 1)[0].splitlines()]
    return [line.split("  #")[0] for line in lines if line.startswith(tool)]


def run_line(line: str, stack: LocalStack, path: str) -> subprocess.CompletedProcess[str]:
    port = stack.pipeline_address.split(",")[0].rsplit(":", 1)[1]
    command = re.sub(r"127\.0\.0\.1:50051", f"127.0.0.1:{port}", line)
    return subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30,
                          env={"TOKEN": stack.tokens["viewer"], "PATH": path})


def test_the_readmes_buf_curl_commands_run(stack: LocalStack) -> None:
    lines = readme_lines("buf curl")
    assert len(lines) == 3
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    health, methods, listed = (run_line(line, stack, path) for line in lines)
    assert health.returncode == 0 and json.loads(health.stdout) == {"status": "SERVING"}, health.stderr
    assert methods.returncode == 0 and "segtrain.pipeline.v1.PipelineService/ExportModel" in methods.stdout, methods
    assert listed.returncode == 0, listed.stderr
    assert "pipelines/segmentation" in {p["name"] for p in json.loads(listed.stdout)["pipelines"]}


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed (the wire-level checks above "
                                                           "ran without it)")
def test_the_readmes_grpcurl_commands_run(stack: LocalStack) -> None:
    lines = readme_lines("grpcurl")
    assert len(lines) == 4
    for line in lines:
        done = run_line(line, stack, "/usr/bin:/bin:/usr/local/bin")
        assert done.returncode == 0, (line, done.stderr)
