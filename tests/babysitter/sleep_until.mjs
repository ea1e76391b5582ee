// Sleep fixture: ctx.sleepUntil(inputs.until) (epoch ms, chosen by the test so that
// every replay asks for the same target), then one shell task.
import { defineTask } from "@a5c-ai/babysitter-sdk";

const shellStep = defineTask("shell-step", (args) => ({
  kind: "shell",
  title: args.title,
  shell: { command: args.command, timeout: 30000 },
}));

export async function process(inputs, ctx) {
  const slept = await ctx.sleepUntil(inputs.until);
  const after = await ctx.task(shellStep, { title: "after-sleep", command: "echo awake" });
  return { slept: slept ?? null, after };
}
