"""`onebase serve | query | adapters`: run an endpoint, query it, hot-swap its adapters."""

from __future__ import annotations

import argparse
import json


def register(sub) -> dict:
    serve_cmd = sub.add_parser("serve", help="serve a Ray Serve config: one frozen base, many adapters")
    serve_cmd.add_argument("config", help="Serve config YAML (e.g. serving/local.yaml)")
    serve_cmd.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    serve_cmd.add_argument("--host", help="override http_options.host")
    serve_cmd.add_argument("--port", type=int, help="override http_options.port")

    query = sub.add_parser("query", help="ask a served adapter (or the bare base)")
    query.add_argument("text", nargs="+")
    query.add_argument("--adapter", "--model", dest="model", required=True, help="adapter id or base name")
    query.add_argument("--chat", action="store_true", help="chat completion instead of a plain completion")
    query.add_argument("--max-tokens", type=int, default=64)
    query.add_argument("--temperature", type=float, default=0.0)
    _endpoint_args(query)

    adapters = sub.add_parser("adapters", help="list, load, unload or promote adapters without a restart")
    verbs = adapters.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list")
    load = verbs.add_parser("load")
    load.add_argument("id")
    load.add_argument("source", help="local dir, models:/name/version, models:/name@alias or s3://bucket/prefix")
    load.add_argument("--base", help="the served base (default: found from the adapter's base fingerprint)")
    unload = verbs.add_parser("unload")
    unload.add_argument("id")
    promote = verbs.add_parser("promote", help="switch an adapter to another registry version")
    promote.add_argument("id")
    promote.add_argument("version")
    promote.add_argument("--alias", help="move this registry alias to the version (default: the source's alias)")
    for parser in (adapters, *verbs.choices.values()):
        _endpoint_args(parser)
    return {"serve": cmd_serve, "query": cmd_query, "adapters": cmd_adapters}


def _endpoint_args(parser) -> None:
    parser.add_argument("--url", help="endpoint (default: $ONEBASE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="default: $ONEBASE_API_KEY")
    parser.add_argument("--admin-token", help="default: $ONEBASE_ADMIN_TOKEN")


def cmd_serve(args: argparse.Namespace) -> int:
    from onebase.serve.run import serve_config

    serve_config(args.config, address=args.address, host=args.host, port=args.port)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from onebase.serve.client import Client

    client = Client(args.url, args.api_key)
    text = " ".join(args.text)
    kind = next((m for m in client.models() if m["id"] == args.model), None)
    if kind is not None and kind["task"] == "sequence-classification":
        result = client.classify(args.model, text)[0]
        print(f"{result['label']}  {json.dumps(result['probabilities'])}")
    elif args.chat:
        print(client.chat(args.model, text, args.max_tokens, args.temperature))
    else:
        print(client.complete(args.model, text, args.max_tokens, args.temperature))
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    from onebase.serve.client import Client

    client = Client(args.url, args.api_key, args.admin_token)
    if args.verb == "list":
        listing = client.adapters()
        for entry in listing["adapters"]:
            print(f"{entry['id']:<24} {entry['method']:<12} {entry['task']:<24} base {entry['base']:<16} "
                  f"rev {entry['revision']:<4} {entry['source']}")
        for adapter_id, reason in listing["failed"].items():
            print(f"{adapter_id:<24} FAILED: {reason}")
        return 0
    if args.verb == "load":
        result = client.load(args.id, args.source, args.base)
    elif args.verb == "unload":
        result = client.unload(args.id)
    else:
        result = client.promote(args.id, args.version, args.alias)
    print(json.dumps(result))
    return 0
