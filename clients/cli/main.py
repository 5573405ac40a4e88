"""`segtrain`: every step of the workflow from a shell. Every verb takes --json."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeAlias, TypeVar

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from segtrain.common.v1 import common_pb2
from segtrain.pipeline.v1 import pipeline_pb2 as pb

from clients import names, profiles
from clients.names import TERMINAL
from clients.sdk import EXPORT_FORMATS, IMAGE_SUFFIXES, Client, Tls, TrainingSetFailedError
from segcore import hyperparameters as contract

Handler = Callable[[argparse.Namespace, Client], int]
Verbs: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # a parser's subcommands
M = TypeVar("M", bound=Message)


def _out(args: argparse.Namespace, message: Message | dict[str, Any], text: str) -> None:
    if args.json:
        data = message if isinstance(message, dict) else MessageToDict(message, preserving_proto_field_name=True)
        print(json.dumps(data), flush=True)
    else:
        print(text, flush=True)


state_name = names.state_name


def _listing(key: str, fetch: Callable[[Client, argparse.Namespace], Sequence[M]], row: Callable[[M], str]
             ) -> Handler:
    """A `list` verb: one line per item, or {key: [...]} with --json."""

    def handler(args: argparse.Namespace, client: Client) -> int:
        items = fetch(client, args)
        _out(args, {key: [MessageToDict(i, preserving_proto_field_name=True) for i in items]},
             "\n".join(row(i) for i in items))
        return 0

    return handler


def _pipeline_row(p: pb.Pipeline) -> str:
    return (f"{p.name:32} {p.display_name:28} {p.Type.Name(p.type).removeprefix('TYPE_'):9} "
            f"classes={','.join(p.class_names)} tile={p.tile_size}")


def _architecture_row(a: pb.Architecture) -> str:
    return f"{a.name:28} {a.parameter_count:>12,} params{'  (default)' if a.is_default else ''}  {a.description}"


def _training_set_row(t: pb.TrainingSet) -> str:
    return (f"{t.name:32} {t.tile_count:>5} tiles ({t.train_tile_count} train, {t.validation_tile_count} val)  "
            f"classes={','.join(t.class_names)}  {t.snapshot[:19]}")


def _job_row(j: pb.Job) -> str:
    return (f"{j.name:24} {state_name(j.state):11} {j.progress.percent:5.0f}%  {j.hyperparameters.architecture:24} "
            f"{j.training_set}" + (f"  by {j.owner}" if j.owner else ""))


def _model_row(m: pb.Model) -> str:
    return (f"{m.name:24} {m.architecture:24} best epoch {m.best_epoch:>3}  val IoU {m.best_metrics.val_iou:.4f}  "
            f"from {m.job}" + "".join(f"  QUALITY WARNING {w.code} ({w.class_name})" for w in m.quality_warnings))


cmd_pipelines_list = _listing("pipelines", lambda c, a: c.list_pipelines(), _pipeline_row)
cmd_architectures_list = _listing("architectures", lambda c, a: c.list_architectures(), _architecture_row)
cmd_sets_list = _listing("training_sets", lambda c, a: c.list_training_sets(owner=a.owner), _training_set_row)
cmd_jobs_list = _listing("jobs", lambda c, a: c.list_jobs(owner=a.owner), _job_row)
cmd_models_list = _listing("models", lambda c, a: c.list_models(owner=a.owner), _model_row)


def _analysis_row(a: pb.AnalysisJob) -> str:
    return (f"{a.name:26} {state_name(a.state):11} {a.progress.tiles_done:>7}/{a.tile_count:<7} tiles  {a.model:24} "
            f"{a.training_set or 'uploaded tiles'}")


cmd_analyses_list = _listing("analysis_jobs", lambda c, a: c.list_analyses(owner=a.owner), _analysis_row)


def cmd_sets_create(args: argparse.Namespace, client: Client) -> int:
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else []
    shown = [-1]

    def progress(ts: pb.TrainingSet) -> None:
        if ts.state == pb.TrainingSet.STATE_PREPARING and ts.tiles_checked != shown[0] and not args.json:
            shown[0] = ts.tiles_checked
            print(f"{ts.name}: {ts.tiles_checked}/{ts.tile_count} tiles checked", file=sys.stderr, flush=True)

    try:
        ts = client.create_training_set(args.name, Path(args.tiles), Path(args.masks or args.annotations),
                                        format=args.format, pipeline=args.pipeline, class_names=classes,
                                        group_by=args.group_by, instance_class=args.instance_class,
                                        wait=not args.no_wait, on_progress=progress)
    except TrainingSetFailedError as exc:
        ts = exc.training_set
    return _show_set(args, ts)


def cmd_sets_get(args: argparse.Namespace, client: Client) -> int:
    return _show_set(args, client.get_training_set(args.training_set))


def _show_set(args: argparse.Namespace, ts: pb.TrainingSet) -> int:
    """A set's state and report; exit status 1 if it FAILED."""
    if ts.state == pb.TrainingSet.STATE_PREPARING:
        lines = [f"{ts.name}: PREPARING, {ts.tiles_checked}/{ts.tile_count} tiles checked"]
    elif ts.state == pb.TrainingSet.STATE_FAILED:
        lines = [f"{ts.name}: FAILED: {ts.failure_reason}"]
        lines += [f"  {i.code}: {i.message}" for i in ts.report.issues
                  if i.severity == pb.ValidationIssue.SEVERITY_ERROR]
    else:
        lines = [f"{ts.name}: {ts.tile_count} tiles ({ts.train_tile_count} train, {ts.validation_tile_count} "
                 f"validation), snapshot {ts.snapshot[:19]}"]
        lines += [f"  {c.class_name:16} {c.pixel_count:>10} px in {c.tile_count} tiles" for c in ts.report.classes]
        lines += [f"  warning {i.code}: {i.tile + ': ' if i.tile else ''}{i.message}" for i in ts.report.issues]
    ts.ClearField("tiles")
    _out(args, ts, "\n".join(lines))
    return 1 if ts.state == pb.TrainingSet.STATE_FAILED else 0


def _hyperparameters(args: argparse.Namespace) -> common_pb2.Hyperparameters:
    params = common_pb2.Hyperparameters()
    for parameter in contract.PARAMETERS:
        value = getattr(args, parameter.name)
        if value is not None:
            setattr(params, parameter.name, value)
    return params


def _add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter of the training contract; unset flags take the pipeline's defaults."""
    for p in contract.PARAMETERS:
        flag = "--" + p.name.replace("_", "-")
        limits = f"; {p.bounds_text()}" if p.kind in (int, float) else ""
        text = f"{p.doc} (default {p.default_text()}{limits})".replace("%", "%%")
        if p.kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type=p.kind, choices=p.choices, default=None, help=text)


def cmd_jobs_create(args: argparse.Namespace, client: Client) -> int:
    job = client.create_job(pipeline=args.pipeline, training_set=args.training_set,
                            from_model=args.from_model or "", hyperparameters=_hyperparameters(args),
                            processes=args.processes, nodes=args.nodes)
    _out(args, job, job.name)
    return 0


def cmd_jobs_start(args: argparse.Namespace, client: Client) -> int:
    job = client.start_job(args.job)
    _out(args, job, f"{job.name} {state_name(job.state)}")
    return 0


def cmd_jobs_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel_job(args.job, stop_early=args.stop_early)
    _out(args, job, f"{job.name} {state_name(job.state)}")
    return 0


def _deleting(what: str, delete: Callable[[Client, str], None]) -> Handler:
    """A `delete` verb: deletes the named resource, or says what still uses it."""

    def handler(args: argparse.Namespace, client: Client) -> int:
        delete(client, args.name)
        _out(args, {"deleted": args.name}, f"deleted {what} {args.name}")
        return 0

    return handler


cmd_sets_delete = _deleting("training set", Client.delete_training_set)
cmd_jobs_delete = _deleting("job", Client.delete_job)
cmd_models_delete = _deleting("model", Client.delete_model)


def cmd_models_export(args: argparse.Namespace, client: Client) -> int:
    """Exports a model (made on a trainer node the first time) and downloads its files to --out."""
    out = Path(args.out)
    export = client.export_model(args.name, args.format, out)
    check = (f"; checked against torch on {', '.join(export.checked_shapes)}: largest logit difference "
             f"{export.max_abs_difference:.2g}") if export.checked_shapes else ""
    _out(args, export, f"{export.model} as {args.format}: {len(export.files)} files in {out} "
                       f"({sum(f.size_bytes for f in export.files) / 2**20:.1f} MiB){check}")
    return 0
cmd_analyses_delete = _deleting("analysis", Client.delete_analysis)


def cmd_jobs_get(args: argparse.Namespace, client: Client) -> int:
    job = client.get_job(args.job)
    p, m = job.progress, job.latest_metrics
    text = [f"{job.name}  {state_name(job.state)}  {p.percent:.0f}%  epoch {p.epoch}/{p.epochs}  "
            f"attempt {job.attempt}"]
    if job.HasField("latest_metrics"):
        text.append(_epoch_line(m))
    if job.failure_reason:
        text.append(f"reason: {job.failure_reason}")
    if job.model:
        text.append(f"model: {job.model}")
    if job.normalization_reason:
        text.append(f"normalization: {job.normalization_reason}")
    text += [f"QUALITY WARNING {w.code} ({w.class_name}): {w.message}" for w in job.quality_warnings]
    _out(args, job, "\n".join(text))
    return 0


def _epoch_line(m: common_pb2.EpochMetrics) -> str:
    return (f"Epoch {m.epoch}/{m.epochs}: Train Loss {m.train_loss:.4f}, Train IoU {m.train_iou:.4f}, "
            f"Val Loss {m.val_loss:.4f}, Val IoU {m.val_iou:.4f}")


def cmd_jobs_watch(args: argparse.Namespace, client: Client) -> int:
    """Follows a job or an analysis job; exit status 0 if it SUCCEEDED."""
    view = WatchView(live=sys.stdout.isatty() and not args.json)
    final = 0
    for event in client.watch(args.job, after_seq=args.after_seq):
        if args.json:
            _out(args, event, "")
        else:
            view.show(event)
        if event.HasField("state_change") and event.state_change.state in TERMINAL:
            final = event.state_change.state
    view.close()
    return 0 if final == common_pb2.JOB_STATE_SUCCEEDED else 1


class WatchView:
    """Human output of `jobs watch`: a table of epochs that fills in, state changes and advice,
    and (on a terminal) a live progress bar with ETA on the last line."""

    def __init__(self, live: bool, stream: TextIO | None = None) -> None:
        self._live = live
        self._bar = ""
        self._stream = stream or sys.stdout

    def show(self, event: common_pb2.JobEvent) -> None:
        kind = event.WhichOneof("payload")
        line = ""
        if kind == "epoch_metrics":
            line = _epoch_line(event.epoch_metrics) + ("  *best" if event.epoch_metrics.is_best else "")
        elif kind == "state_change":
            reason = f" ({event.state_change.reason})" if event.state_change.reason else ""
            line = f"state: {state_name(event.state_change.state)}{reason}"
        elif kind in ("warning", "advice"):
            line = f"{kind}: {getattr(event, kind).message}"
        if line:
            self._print(line)
        if self._live and event.HasField("progress"):
            self._bar = progress_bar(event.progress)
            print(f"\r\x1b[2K{self._bar}", end="", flush=True, file=self._stream)

    def _print(self, line: str) -> None:
        if self._live and self._bar:
            print("\r\x1b[2K", end="", file=self._stream)
        print(line, flush=True, file=self._stream)
        if self._live and self._bar:
            print(self._bar, end="", flush=True, file=self._stream)

    def close(self) -> None:
        if self._live and self._bar:
            print(file=self._stream)


def progress_bar(p: common_pb2.Progress, width: int = 30) -> str:
    filled = int(width * p.percent / 100)
    eta = f" ETA {_duration(p.eta.ToTimedelta().total_seconds())}" if p.HasField("eta") else ""
    phase = common_pb2.Phase.Name(p.phase).removeprefix("PHASE_").lower().replace("_", " ")  # type: ignore[arg-type]
    where = f"tiles {p.tiles_done}/{p.tiles}" if p.tiles else f"epoch {p.epoch}/{p.epochs}  batch {p.batch}/{p.batches}"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {p.percent:5.1f}%  {where}  "
            f"{phase}  elapsed {_duration(p.elapsed.ToTimedelta().total_seconds())}{eta}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def cmd_jobs_rerun(args: argparse.Namespace, client: Client) -> int:
    job = client.rerun(args.job)
    _out(args, job, job.name)
    return 0


def cmd_jobs_compare(args: argparse.Namespace, client: Client) -> int:
    comparison = client.compare(args.jobs)
    lines = ["differences:" if comparison.differences else "same configuration"]
    lines += [f"  {d.field}: {' | '.join(d.values)}" for d in comparison.differences]
    by_epoch: dict[int, list[str]] = {}
    for series in comparison.series:
        for m in series.epochs:
            by_epoch.setdefault(m.epoch, ["-"] * len(comparison.series))
    for i, series in enumerate(comparison.series):
        for m in series.epochs:
            by_epoch[m.epoch][i] = f"{m.val_loss:.4f}/{m.val_iou:.4f}"
    lines.append("epoch  " + "  ".join(f"{names.resource_id(s.job):>17}" for s in comparison.series)
                 + "   (val loss/val IoU)")
    lines += [f"{e:5}  " + "  ".join(f"{v:>17}" for v in row) for e, row in sorted(by_epoch.items())]
    for d in comparison.drift:
        lines.append(f"drift of {d.job} over {d.epochs_compared} epochs: "
                     + ("identical" if d.identical else f"max |d val IoU| {d.max_val_iou:.2e}, "
                        f"|d val loss| {d.max_val_loss:.2e}, |d train loss| {d.max_train_loss:.2e}"))
    _out(args, comparison, "\n".join(lines))
    return 0


def cmd_jobs_chart(args: argparse.Namespace, client: Client) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loss, iou = client.charts(args.jobs, args.width, args.height)
    stem = names.resource_id(args.jobs[0]) if len(args.jobs) == 1 else "jobs"
    paths = {"loss": out / f"{stem}-loss.png", "iou": out / f"{stem}-iou.png"}
    paths["loss"].write_bytes(loss)
    paths["iou"].write_bytes(iou)
    _out(args, {k: str(v) for k, v in paths.items()}, "\n".join(str(p) for p in paths.values()))
    return 0


def cmd_analyses_create(args: argparse.Namespace, client: Client) -> int:
    """Starts an analysis job; unless --no-wait, follows it (progress on stderr) and, with --out,
    downloads its masks and statistics. Exit status 1 if it did not succeed."""
    tiles = []
    if args.tiles:
        tiles = sorted(p for p in Path(args.tiles).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not tiles:
            raise SystemExit(f"no images (png, jpg, tif) in {args.tiles}")
    job = client.create_analysis(args.model, tiles=tiles, training_set=args.training_set or "")
    if args.no_wait:
        _out(args, job, job.name)
        return 0
    print(f"{job.name}: {job.tile_count} tiles queued", file=sys.stderr, flush=True)
    view = WatchView(live=sys.stderr.isatty() and not args.json, stream=sys.stderr)
    job = client.wait_for_analysis(job.name, on_event=view.show)
    view.close()
    return _show_analysis(args, client, job, Path(args.out) if args.out else None)


def cmd_analyze(args: argparse.Namespace, client: Client) -> int:
    """`analyses create --out` under its first name."""
    args.training_set, args.no_wait = "", False
    return cmd_analyses_create(args, client)


def cmd_analyses_get(args: argparse.Namespace, client: Client) -> int:
    return _show_analysis(args, client, client.get_analysis(args.analysis), None)


def cmd_analyses_cancel(args: argparse.Namespace, client: Client) -> int:
    job = client.cancel_analysis(args.analysis)
    _out(args, job, f"{job.name}: {state_name(job.state)}")
    return 0


def _show_analysis(args: argparse.Namespace, client: Client, job: pb.AnalysisJob, out: Path | None) -> int:
    """An analysis's state and, once SUCCEEDED, its per-class totals (and, with `out`, its files
    downloaded there). Exit status 1 unless it SUCCEEDED."""
    lines = [f"{job.name}: {state_name(job.state)}, {job.progress.tiles_done}/{job.tile_count} tiles"
             + (f" ({job.failure_reason})" if job.failure_reason else "")]
    data: dict[str, Any] = {"analysis": MessageToDict(job, preserving_proto_field_name=True)}
    if job.state == common_pb2.JOB_STATE_SUCCEEDED:
        r = job.results
        lines.append(f"{r.tiles_analysed} tiles analysed, {r.tiles_failed} failed")
        lines += [f"  {c.class_name:20} {100 * c.area_fraction:6.2f}% of the area  {c.object_count:>8} objects  "
                  f"in {c.tiles_present} tiles" for c in r.classes]
        if out is not None:
            tiles = client.download_analysis(job, out)
            data["tiles"] = [MessageToDict(t, preserving_proto_field_name=True) for t in tiles]
            lines.append(f"{sum(1 for t in tiles if t.mask_uri)} masks, manifest.json, tiles.csv, tiles.json, "
                         f"classes.csv and classes.json written to {out}")
            lines += [f"  {t.tile}: {t.error}" for t in tiles if t.error][:20]
    _out(args, data, "\n".join(lines))
    return 0 if job.state == common_pb2.JOB_STATE_SUCCEEDED else 1


def cmd_login(args: argparse.Namespace, client: Client | None) -> int:
    """Reads the token, checks that it answers at the address, and saves both as a profile."""
    token = ""
    if args.token_file is not None:
        text = args.token_file.read_text().strip()
        if text.startswith("{"):  # a credentials file: role -> token
            tokens = json.loads(text)
            if args.role not in tokens:
                raise ValueError(f"{args.token_file} has no {args.role!r} token (it has {sorted(tokens)})")
            token = tokens[args.role]
        else:
            token = text
    profile = profiles.Profile(
        address=args.login_address, token=token or (args.token or ""), tls=args.tls,
        **{f"tls_{kind}_file": str(getattr(args, f"tls_{kind}_file").resolve()) if getattr(args, f"tls_{kind}_file")
           else None for kind in ("ca", "cert", "key")})
    tls = Tls.from_profile(profile)
    with Client(profile.address, token=profile.token, tls=tls, profile=None) as checked:
        checked.list_pipelines()  # the address answers and the token is accepted
    name = args.name or args.profile or args.login_address
    path = profiles.save(name, profile)
    _out(args, {"profile": name, "address": profile.address, "config": str(path)},
         f"logged in to {profile.address}; profile {name!r} (current) in {path}")
    return 0


def cmd_up(args: argparse.Namespace, client: Client | None) -> int:
    from clients.stack import LocalStack, port_holder

    for port, what in ((args.port, "--port"), (args.port + 1, "--port + 1 (metrics)"), (args.s3_port, "--s3-port")):
        holder = port_holder(port) if port else None
        if holder is not None:
            print(f"port {port} ({what}) is taken by {holder}: stop it, or choose another port", file=sys.stderr)
            return 2
    stack = LocalStack(Path(args.data_dir).resolve(), trainers=args.trainers, pipeline_port=args.port,
                       metrics_port=args.port + 1, s3_port=args.s3_port, pipeline_replicas=args.pipeline_replicas,
                       metrics_replicas=args.metrics_replicas, database_url=args.database_url)
    # Stopped by a supervisor (SIGTERM), a closed terminal (SIGHUP) or Ctrl-C, even when started in
    # the background (where a shell starts it with SIGINT ignored): every child is stopped first.
    for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, _stopped_by)
    try:  # whenever a signal comes, starting or running, the finally stops every child
        stack.start()
        # The local user is the stack's admin: the profile lets any shell use it with no exports.
        try:
            config: Path | str = profiles.save(profiles.LOCAL, profiles.Profile(address=stack.pipeline_address,
                                                                                token=stack.tokens["admin"]))
        except (OSError, profiles.ProfileError) as exc:  # the stack serves anyway
            config = f"not written ({exc})"
        info = {"pipeline": stack.pipeline_address, "metrics": stack.metrics_address, "s3": stack.s3_endpoint,
                "trainers": [f"127.0.0.1:{p}" for p in stack.trainer_ports], "logs": str(stack.logs),
                "prometheus": " ".join(f"{name}=http://127.0.0.1:{port}/metrics"
                                       for name, port in sorted(stack.prometheus_ports.items())),
                "profile": f"{profiles.LOCAL} (current) in {config}", "credentials": str(stack.credentials_file)}
        _out(args, info, "\n".join([f"{k:11} {v}" for k, v in info.items()] + [
            "In another shell, `segtrain pipelines list` uses the profile (admin). Tokens per role (admin, trainer,",
            f"viewer) are in the credentials file: `segtrain login --address {stack.pipeline_address} --token-file "
            f"{stack.credentials_file} --role viewer --name local-viewer`.",
            "Ctrl-C stops everything."]))
        while (lost := stack.lost_service()) is None:
            time.sleep(0.5)
        print(f"{lost} exited; stopping (see the logs in {stack.logs})", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stopped):
        return 0
    finally:
        for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(stop_signal, signal.SIG_IGN)  # a second signal must not cut the stopping short
        stack.stop()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


class _Stopped(BaseException):
    """A stop signal arrived (BaseException: no `except Exception` on the way may swallow it)."""


def _stopped_by(signum: int, frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segtrain", description=__doc__)
    parser.add_argument("--address", help="pipeline service, or a comma-separated list of its replicas (default: "
                                           "$SEGTRAIN_ADDRESS, else the profile's, else 127.0.0.1:50051)")
    parser.add_argument("--token", help="bearer token (default: $SEGTRAIN_TOKEN, else the profile's)")
    parser.add_argument("--profile", help="connection profile (default: $SEGTRAIN_PROFILE, else the current one: "
                                           "what `segtrain up` or `segtrain login` wrote last)")
    sub = parser.add_subparsers(dest="verb", required=True)
    _add_up(sub)
    _add_login(sub)
    _verb(_group(sub, "pipelines"), "list", cmd_pipelines_list)
    _verb(_group(sub, "architectures"), "list", cmd_architectures_list)
    _add_sets(_group(sub, "sets"))
    _add_jobs(_group(sub, "jobs"))
    models = _group(sub, "models")
    _owned(_verb(models, "list", cmd_models_list))
    _verb(models, "delete", cmd_models_delete, help="delete a model and its weights (not while a job or analysis "
                                                    "that has not ended uses it)").add_argument("name")
    export = _verb(models, "export", cmd_models_export,
                   help="export a model to a format other tools load without segtrain, and download it")
    export.add_argument("name")
    export.add_argument("--format", choices=list(EXPORT_FORMATS), required=True,
                        help="hf: a transformers save_pretrained directory; onnx: model.onnx (dynamic batch and "
                             "size); torchscript: model.pt")
    export.add_argument("--out", required=True, help="directory to write the files to")
    _add_analyses(_group(sub, "analyses"))
    _add_analyze(sub)
    return parser


def _verb(verbs: Verbs, name: str, handler: Handler | Callable[..., int], **kw: Any) -> argparse.ArgumentParser:
    """A verb (or a group's action) with --json, dispatching to its handler."""
    child = verbs.add_parser(name, **kw)
    child.add_argument("--json", action="store_true", help="print JSON (one object per line)")
    child.set_defaults(handler=handler)
    return child


def _owned(verb: argparse.ArgumentParser) -> None:
    verb.add_argument("--owner", default="", help="only what this principal created (a token's name)")


def _group(verbs: Verbs, name: str) -> Verbs:
    """A command group such as `jobs`, whose actions are its subcommands."""
    return verbs.add_parser(name).add_subparsers(dest="action", required=True)


def _add_up(verbs: Verbs) -> None:
    up = _verb(verbs, "up", cmd_up, help="start the local stack (S3 server, 3 services, trainer nodes)")
    up.add_argument("--data-dir", default=".segtrain", help="data and logs folder (default .segtrain)")
    up.add_argument("--port", type=int, default=50051, help="pipeline port; metrics uses port+1")
    up.add_argument("--s3-port", type=int, default=9000)
    up.add_argument("--trainers", type=int, default=1)
    up.add_argument("--pipeline-replicas", type=_positive, default=1, metavar="N",
                    help="pipeline service processes sharing the work (the first on --port, the others on free "
                         "ports; the address printed lists them all)")
    up.add_argument("--metrics-replicas", type=_positive, default=1, metavar="M",
                    help="metrics service processes serving one event log (the first on --port + 1)")
    up.add_argument("--database-url", default=None, metavar="URL",
                    help="one database for both services (e.g. postgresql+psycopg://user@host/db); default: a "
                         "SQLite file per service in --data-dir, which replicas on this machine share")


def _add_login(verbs: Verbs) -> None:
    login = _verb(verbs, "login", cmd_login, help="check a deployment's address and token, then keep them as a "
                                                  "profile in the config file (0600) for every later command")
    login.add_argument("--address", dest="login_address", required=True, metavar="ADDRESS",
                       help="the pipeline service (or a comma-separated list of its replicas)")
    login.add_argument("--token-file", type=Path, metavar="FILE",
                       help="a file holding the bearer token (a credentials.json: --role picks the token)")
    login.add_argument("--role", default="admin", help="with a credentials.json: whose token (default admin)")
    login.add_argument("--tls", action="store_true", help="TLS verified with the system's roots")
    login.add_argument("--tls-ca-file", type=Path, help="TLS verified with this CA")
    login.add_argument("--tls-cert-file", type=Path, help="client certificate, for mutual TLS")
    login.add_argument("--tls-key-file", type=Path, help="its key")
    login.add_argument("--name", default=None, metavar="PROFILE",
                       help="the profile's name (default: --profile, else the address)")


def _add_sets(group: Verbs) -> None:
    _owned(_verb(group, "list", cmd_sets_list, help="list training sets, newest first"))
    create = _verb(group, "create", cmd_sets_create, help="create a training set from local files")
    create.add_argument("name")
    create.add_argument("--tiles", required=True, help="folder of tile images")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--masks", help="folder of per-tile annotation files paired with tiles by file stem "
                                        "(masks, instance masks, GeoJSON, Django-Labeller <stem>__labels.json)")
    source.add_argument("--annotations", help="one annotation file for all tiles (COCO JSON, GeoJSON)")
    create.add_argument("--format", default="masks", choices=["masks", "instance-masks", "coco", "geojson", "labeller"])
    create.add_argument("--classes", help="class names by index, comma-separated (index 0 = background)")
    create.add_argument("--instance-class", type=int, help="class index of every instance (--format instance-masks)")
    create.add_argument("--pipeline", default=names.DEFAULT_PIPELINE)
    create.add_argument("--group-by", default="", help="regex; its first group on a tile's stem names the source image")
    create.add_argument("--no-wait", action="store_true", help="return at once, the set PREPARING")
    _verb(group, "get", cmd_sets_get, help="a set's state, progress and report").add_argument("training_set")
    _verb(group, "delete", cmd_sets_delete, help="delete a set, its tiles and objects (not while a job or "
                                                 "analysis that has not ended uses it)").add_argument("name")


def _add_jobs(group: Verbs) -> None:
    """The job lifecycle: list, create, start, get, cancel, watch, rerun; then compare and chart."""
    _owned(_verb(group, "list", cmd_jobs_list, help="list jobs, newest first"))
    create = _verb(group, "create", cmd_jobs_create, help="create a job; prints its name")
    create.add_argument("--pipeline", required=True)
    create.add_argument("--training-set", required=True)
    create.add_argument("--from-model")
    create.add_argument("--processes", type=int, default=0,
                        help="data-parallel processes per node (default 1); the batch size is the global batch")
    create.add_argument("--nodes", type=int, default=0, help="trainer nodes, all started together (default 1)")
    _add_hyperparameter_flags(create)
    for name, handler in (("start", cmd_jobs_start), ("get", cmd_jobs_get)):
        _verb(group, name, handler).add_argument("job")
    cancel = _verb(group, "cancel", cmd_jobs_cancel)
    cancel.add_argument("job")
    cancel.add_argument("--stop-early", action="store_true", help="keep and register the best model so far")
    watch = _verb(group, "watch", cmd_jobs_watch, help="follow a job live until it ends")
    watch.add_argument("job")
    watch.add_argument("--after-seq", type=int, default=0, help="start after event N")
    _verb(group, "rerun", cmd_jobs_rerun, help="create and start a copy of a job (same seed)").add_argument("job")
    _verb(group, "delete", cmd_jobs_delete, help="delete an ended job and what it stored (its model first)"
          ).add_argument("name")
    _add_job_results(group)


def _add_job_results(group: Verbs) -> None:
    compare = _verb(group, "compare", cmd_jobs_compare, help="configurations, metrics and drift side by side")
    compare.add_argument("jobs", nargs="+")
    chart = _verb(group, "chart", cmd_jobs_chart, help="write loss and IoU graphs as PNG")
    chart.add_argument("jobs", nargs="+")
    chart.add_argument("--out", default=".")
    chart.add_argument("--width", type=int, default=800)
    chart.add_argument("--height", type=int, default=480)


def _add_analyses(group: Verbs) -> None:
    """Analysis jobs: create (and follow, and download), get, list, watch, cancel."""
    create = _verb(group, "create", cmd_analyses_create, help="analyse tiles with a model, as a job")
    create.add_argument("--model", required=True)
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiles", help="folder of images to analyse")
    source.add_argument("--training-set", help="analyse every tile of this training set")
    create.add_argument("--out", help="download masks, manifest, CSV and JSON here when it succeeds")
    create.add_argument("--no-wait", action="store_true", help="print its name and return at once, QUEUED")
    for name, handler in (("get", cmd_analyses_get), ("cancel", cmd_analyses_cancel)):
        _verb(group, name, handler).add_argument("analysis")
    _verb(group, "delete", cmd_analyses_delete, help="delete an ended analysis and its results").add_argument("name")
    _owned(_verb(group, "list", cmd_analyses_list, help="list analysis jobs, newest first"))
    watch = _verb(group, "watch", cmd_jobs_watch, help="follow an analysis live until it ends")
    watch.add_argument("job", metavar="analysis", type=names.analysis)
    watch.add_argument("--after-seq", type=int, default=0, help="start after event N")


def _add_analyze(verbs: Verbs) -> None:
    analyze = _verb(verbs, "analyze", cmd_analyze, help="run a model on a folder of tiles (an analysis job)")
    analyze.add_argument("--model", required=True)
    analyze.add_argument("--tiles", required=True)
    analyze.add_argument("--out", required=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.handler is cmd_up:
        return cmd_up(args, None)
    try:
        if args.handler is cmd_login:
            return cmd_login(args, None)
        with Client(args.address, token=args.token, profile=args.profile) as client:
            return int(args.handler(args, client))
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
