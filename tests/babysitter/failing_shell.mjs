// Fixture (c): a shell task that fails (exit 3). An executor posts the failure as an *ok*
// result {success: false, exitCode, stdout, stderr, error}; the process receives that
// object, inspects it, runs one more task, and returns what it saw. (Posting the failure
// with --status error instead would make ctx.task throw and fail the whole run.)
import { defineTask } from "@a5c-ai/babysitter-sdk";

const shellStep = defineTask("shell-step", (args) => ({
  kind: "shell",
  title: args.title,
  shell: { command: args.command, timeout: 30000 },
}));

export async function process(inputs, ctx) {
  const result = await ctx.task(
    shellStep,
    { title: "fails", command: "echo partial output; echo something broke >&2; exit 3" },
    { label: "fails" },
  );
  const failed = typeof result === "object" && result !== null && result.success === false;
  const after = await ctx.task(
    shellStep,
    { title: "after", command: failed ? "echo recovered" : "echo not-needed" },
    { label: "after" },
  );
  return {
    failed,
    exitCode: failed ? result.exitCode : 0,
    stdout: failed ? result.stdout : result,
    stderr: failed ? result.stderr : "",
    error: failed ? result.error : null,
    after,
  };
}
