"""The project's simulated arm (sim/sim_arm.py: MuJoCo, two cameras, differential IK) and
bitvla_node driving it, on simulation time. Type an instruction to see the arm move:

    ros2 launch bitvla_ros bitvla_sim.launch.py model_path:=/models/libero_spatial.bitvla
    ros2 topic pub --once /instruction std_msgs/msg/String "{data: 'pick up the red cube'}"

(scripts/sim_demo.sh starts the same processes with the same parameters and reports what the arm
did.)

Arguments:
    model_path          checkpoint directory or packed .bitvla file (required)
    config              parameter file (default: the package's config/sim_arm.yaml)
    camera_topic        third-person camera (sensor_msgs/Image)
    wrist_camera_topic  wrist camera (sensor_msgs/Image)
    command_topic       twist command input of the simulated arm
    use_sim_time        true: follow /clock
    dry_run             false in simulation
    sim_model           a user MJCF for the sim (default: the built-in scene)

A process that fails ends the launch (both processes) with exit status 1 after its error.
"""

import os
import sys

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bitvla_launch_common import bitvla_node_action, fail_launch_when_a_process_fails  # noqa: E402


def generate_launch_description():
    share = get_package_share_directory("bitvla_ros")
    arg = LaunchConfiguration
    sim = Node(
        package="bitvla_ros",
        executable="sim_arm.py",
        name="sim_arm",
        output="screen",
        parameters=[{
            "model_path": arg("sim_model"),
            "camera_topic": arg("camera_topic"),
            "wrist_camera_topic": arg("wrist_camera_topic"),
            "twist_topic": arg("command_topic"),
            "use_sim_time": ParameterValue(arg("use_sim_time"), value_type=bool),
        }],
    )
    return LaunchDescription([
        DeclareLaunchArgument("model_path", description="checkpoint directory or .bitvla file"),
        DeclareLaunchArgument("config", default_value=os.path.join(share, "config", "sim_arm.yaml"),
                              description="bitvla_node parameter file"),
        DeclareLaunchArgument("camera_topic", default_value="/sim/agentview/image_raw"),
        DeclareLaunchArgument("wrist_camera_topic", default_value="/sim/wrist/image_raw"),
        DeclareLaunchArgument("command_topic", default_value="/servo_node/delta_twist_cmds"),
        DeclareLaunchArgument("dry_run", default_value="false"),
        DeclareLaunchArgument("use_sim_time", default_value="true"),
        DeclareLaunchArgument("sim_model", default_value="", description="MJCF file (empty: the built-in scene)"),
        sim,
        fail_launch_when_a_process_fails(sim),
        bitvla_node_action(),
    ])
