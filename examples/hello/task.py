from keeper_task import Task, TaskContext


class Hello(Task):
    def run(self, ctx: TaskContext) -> None:
        ctx.log.info("hello", broker=ctx.agent_settings.broker_host)


if __name__ == "__main__":
    Hello.main()
