#!/usr/bin/env python3
"""A minimal AIME API Server for scripts/ci-multinode: the worker endpoints of the 0.9.x protocol
as tests/worker.rs's server speaks them (status, login, long-polled job requests with
max_job_batch, progress, one result per job). Hands out the jobs of a JSONL file, appends every
result (job id, text, the worker that sent it) to a file, and refuses what the real
server would (a second result for a job: 500).

Usage: aime-test-server.py ADDR PORT KEY JOBS.jsonl RESULTS.jsonl [WORKERS [PER_REPLY]]
Runs until SIGTERM. Jobs are handed out once WORKERS workers (default 1) have logged in, at most
PER_REPLY (default: as many as the worker asks for) per reply, so that every worker gets some.
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADDR, PORT, KEY, JOBS, RESULTS = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
WORKERS = int(sys.argv[6]) if len(sys.argv) > 6 else 1
PER_REPLY = int(sys.argv[7]) if len(sys.argv) > 7 else 1 << 30
LONG_POLL_S = 1.0

lock = threading.Condition()
with open(JOBS) as f:
    queue = [json.loads(line) for line in f if line.strip()]
assigned, done = set(), set()
logins = []


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body):
        text = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(text)))
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(text)
        except (BrokenPipeError, ConnectionResetError):
            pass  # a worker that stopped waiting (a drain, a shutdown)

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(n) or b"null")
        except ValueError:
            return self.reply(400, {"error": "not JSON"})
        route = self.path.strip("/").split("?")[0]
        if route == "worker_check_server_status":
            ok = isinstance(body, dict) and body.get("auth_key") == KEY
            return self.reply(200, {"cmd": "ok"} if ok else {"cmd": "error", "msg": "Worker not authorized."})
        if route == "worker_login":
            wp = body.get("worker_parameters", {})
            if wp.get("auth_key") != KEY:
                return self.reply(200, {"success": False, "error_msg": "Worker not authorized: wrong auth_key"})
            with lock:
                logins.append(wp.get("auth", "?"))
                lock.notify_all()
            return self.reply(200, {"success": True, "request_timeout": LONG_POLL_S, "api_server_version": "0.9.6"})
        if route == "worker_job_request":
            if "max_job_batch" not in body:
                return self.reply(500, {})
            if body.get("auth_key") != KEY:
                return self.reply(200, {"cmd": "error", "msg": "Worker not authorized."})
            end = time.time() + min(float(body.get("request_timeout") or LONG_POLL_S), LONG_POLL_S)
            with lock:
                while (not queue or len(logins) < WORKERS) and time.time() < end:
                    lock.wait(0.05)
                if not queue or len(logins) < WORKERS:
                    return self.reply(200, {"cmd": "no_job"})
                k = min(len(queue), int(body["max_job_batch"]), PER_REPLY)
                jobs, queue[:k] = queue[:k], []
                assigned.update(j["job_id"] for j in jobs)
            return self.reply(200, {"cmd": "job", "job_data": jobs, "start_time": 1.0})
        if route == "worker_job_progress":
            with lock:
                unknown = [p.get("job_id") for p in body if p.get("job_id") not in assigned]
            return self.reply(500 if unknown else 200, {} if unknown else [{"success": True}])
        if route == "worker_job_result":
            job = body.get("job_id")
            with lock:
                if job in done:
                    return self.reply(500, {})
                if job not in assigned:
                    return self.reply(200, {"cmd": "warning", "msg": "job unknown"})
                done.add(job)
                with open(RESULTS, "a") as f:
                    f.write(json.dumps({"job_id": job, "text": body.get("text"), "worker": body.get("auth")}) + "\n")
            return self.reply(200, {"cmd": "ok"})
        return self.reply(404, {"error": "no route " + route})


ThreadingHTTPServer((ADDR, PORT), Handler).serve_forever()
