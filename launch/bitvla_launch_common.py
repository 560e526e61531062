"""What the package's launch files share (not a launch file itself; they import it from beside
them, in the source tree and in share/bitvla_ros/launch alike):

- ``bitvla_node_action``: bitvla_node with a parameter file, and the launch arguments that
  override it. A topic argument left empty keeps the parameter file's topic, so a profile
  (e.g. ``config:=.../ur_joint_trajectory.yaml``) keeps its own command topic and cameras.
- ``fail_launch_when_a_process_fails``: a process that exits with an error (bitvla_node with a
  bad parameter, a checkpoint that does not load) ends the whole launch with exit status 1,
  after its own error message, instead of leaving the rest running and exiting 0.
"""

from launch.actions import OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

# Launch arguments that override the parameter file's topics when not empty.
TOPIC_ARGUMENTS = ("camera_topic", "wrist_camera_topic", "command_topic")


def _bool_argument(context, name):
    """A true/false launch argument, as ROS 2 parameter files spell booleans."""
    text = LaunchConfiguration(name).perform(context)
    value = text.strip().lower()
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"launch argument {name}:={text!r} is not a boolean: use {name}:=true or {name}:=false")


def bitvla_node_action(extra=None):
    """bitvla_node: parameters from the ``config`` argument, then model_path, dry_run,
    use_sim_time and the non-empty topic arguments (plus ``extra``) over them."""

    def node(context):
        overrides = {
            "model_path": LaunchConfiguration("model_path").perform(context),
            "dry_run": _bool_argument(context, "dry_run"),
            "use_sim_time": _bool_argument(context, "use_sim_time"),
        }
        for name in TOPIC_ARGUMENTS:
            value = LaunchConfiguration(name).perform(context)
            if value:
                overrides[name] = value
        overrides.update(extra or {})
        action = Node(
            package="bitvla_ros",
            executable="bitvla_node",
            name="bitvla_node",
            output="screen",
            parameters=[LaunchConfiguration("config").perform(context), overrides],
        )
        return [action, fail_launch_when_a_process_fails(action)]

    return OpaqueFunction(function=node)


def fail_launch_when_a_process_fails(action):
    """Ends the launch with exit status 1 when ``action``'s process exits with an error while
    the launch is not shutting down (SIGINT, a normal stop, exits 0)."""

    def check(event, context):
        if event.returncode != 0 and not context.is_shutdown:
            raise RuntimeError(
                f"{event.action.name} exited with status {event.returncode} (its error is above); "
                "the launch stops"
            )

    return RegisterEventHandler(OnProcessExit(target_action=action, on_exit=check))
